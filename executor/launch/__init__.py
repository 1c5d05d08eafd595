"""Launch configurations of existing engines for a chosen training plan.

One module per engine turns (model, cluster, plan) into that engine's files and records, as
sentences, every plan feature the engine cannot express (see `base`). An engine that cannot
run the model or plan at all refuses by name (`EngineRefusal`) instead of writing a file that
runs something else; `check_engines` asks before a search. `emit_launch_configs` checks the
plan against the model and cluster, renders every requested engine first, then writes each
file atomically (temporary file + os.replace), so a failure leaves no half-written set and no
temporary files.

Engine names are the engines' current releases; `torchtitan@0.2` is torchtitan 0.2.x, the
last release that reads TOML.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import replace
from pathlib import Path

from executor.launch import deepspeed, megatron, slurm, torchrun, torchtitan, torchtitan_toml
from executor.launch.base import Approximations, EngineRefusal, LaunchFile, engine_names
from simulator.files import write_text_atomic
from simulator.specs.hardware import ClusterSpec
from simulator.specs.model import TransformerSpec
from simulator.specs.plan import TrainingPlan, validate_plan

__all__ = [
    "ENGINES", "Approximations", "EngineRefusal", "LaunchFile", "check_engines", "emit_launch_configs",
    "render", "write_atomic", "write_files",
]

ENGINES = ("megatron", "torchtitan", "torchtitan@0.2", "deepspeed", "torchrun", "slurm")

Writer = Callable[..., list[LaunchFile]]
_WRITERS: dict[str, Writer] = {
    "megatron": megatron.write,
    "torchtitan": torchtitan.write,
    "torchtitan@0.2": torchtitan_toml.write,
    "deepspeed": deepspeed.write,
    "torchrun": torchrun.write,
    "slurm": slurm.write,
}
_TAKES_SCRIPT = {"torchrun", "slurm"}
_MODEL_CHECKS = {"torchtitan": torchtitan.check_model, "torchtitan@0.2": torchtitan_toml.check_model}


def check_engines(model: TransformerSpec, engines: Iterable[str]) -> list[str]:
    """The engine names, checked; raise EngineRefusal for an engine that cannot run `model`
    whatever the plan (so a CLI can refuse before it searches)."""
    names = engine_names(engines, ENGINES)
    for name in names:
        if name in _MODEL_CHECKS:
            _MODEL_CHECKS[name](model)
    return names


def render(
    model: TransformerSpec,
    cluster: ClusterSpec,
    plan: TrainingPlan,
    engines: Iterable[str],
    script: str | None = None,
    refused: list[EngineRefusal] | None = None,
) -> list[LaunchFile]:
    """The files of each engine, in memory, paths relative to the output folder.

    Files shared by engines (plan.yaml for torchrun and slurm) appear once. The torchrun and
    slurm scripts run simtune's training executor, or `script` when given. An engine that
    refuses raises EngineRefusal, or, when `refused` is a list, is appended to it and skipped.
    """
    names = engine_names(engines, ENGINES)
    validate_plan(plan, model, cluster)
    files: dict[Path, LaunchFile] = {}
    for name in names:
        extra = {"script": script} if name in _TAKES_SCRIPT else {}
        try:
            written = _WRITERS[name](model, cluster, plan, **extra)
        except EngineRefusal as err:
            if refused is None:
                raise
            refused.append(err)
            continue
        for f in written:
            files.setdefault(f.path, f)
    return list(files.values())


def emit_launch_configs(
    model: TransformerSpec,
    cluster: ClusterSpec,
    plan: TrainingPlan,
    engines: Iterable[str],
    out_dir: str | Path,
    script: str | None = None,
    refused: list[EngineRefusal] | None = None,
) -> list[LaunchFile]:
    """Write each engine's launch files into `out_dir`; return them with their final paths.

    Unknown engine names raise SpecError, and refusals EngineRefusal (unless collected in
    `refused`), before anything is written.
    """
    return write_files(render(model, cluster, plan, engines, script, refused), out_dir)


def write_files(files: list[LaunchFile], out_dir: str | Path) -> list[LaunchFile]:
    """Write rendered files into `out_dir` atomically; return them with their final paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for f in files:
        path = out / f.path
        write_atomic(path, f.text, 0o755 if f.executable else 0o644)
        written.append(replace(f, path=path))
    return written


def write_atomic(path: Path, text: str, mode: int) -> None:
    """Write `text` to `path` with `mode`, atomically (`simulator.files.write_text_atomic`)."""
    write_text_atomic(path, text, mode)
