"""Launch configurations of serving engines (vLLM, SGLang) for a chosen deployment.

`emit_serving_configs` is `emit_launch_configs` for serving: it checks the deployment against
the model and cluster, renders every requested engine in memory, then writes each file
atomically (`executor.launch.write_atomic`), with `deployment.yaml` beside the scripts so the
simulated deployment travels with them.

Neither engine can change a replica's layout between prefill and decode, so the scripts run
the deployment's *static* layout: the prefill layout. A re-sharding (Seesaw) deployment is
written with its prefill layout and the decode layout is recorded as an approximation.

This module also holds what the engine writers share: the checks, the header naming model,
cluster and deployment, and the shell script around one command. Each script is one
`exec ENGINE "${ARGS[@]}" "$@"` (the array expanded in the form `set -u` accepts on any bash), so extra arguments (`--port 8000`) pass straight through,
and each flag that needs explaining carries its comment inside the ARGS array.
"""

from __future__ import annotations

import math
import shlex
import textwrap
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

from executor.launch import write_files
from executor.launch.base import Approximations, LaunchFile, comment_block, engine_names
from executor.launch.torchrun import SHELL_PROLOGUE, expand
from simulator.errors import SpecError
from simulator.specs.hardware import ClusterSpec
from simulator.specs.model import TransformerSpec
from simulator.specs.serving import DeploymentSpec, Parallel, validate_deployment

__all__ = ["ENGINES", "emit_serving_configs", "render_serving", "validate_deployment"]

ENGINES = ("vllm", "sglang")
WIDTH = 96  # comment text width, as in base.header


@dataclass(frozen=True)
class Flag:
    """One command-line flag with its values, and the comment written above it.

    Words are shell-quoted unless `raw` (a value that refers to a shell variable).
    """

    words: tuple[str, ...]
    note: str | None = None
    raw: bool = False

    def line(self) -> str:
        return " ".join(self.words) if self.raw else shlex.join(self.words)


def flag(*words: object, note: str | None = None, raw: bool = False) -> Flag:
    return Flag(tuple(str(w) for w in words), note, raw)


# --- checks -----------------------------------------------------------------------------------


def static_layout(deployment: DeploymentSpec, approx: Approximations) -> Parallel:
    """The layout both phases run with: the prefill layout, noting a re-sharding deployment."""
    p, d = deployment.prefill, deployment.decode
    if deployment.resharding:
        approx.add(
            f"{approx.engine} cannot re-shard a replica between prefill and decode: wrote the "
            f"prefill layout ({p.describe()}) for both phases; the simulated decode layout "
            f"({d.describe()}) is not used"
        )
    return p


def nodes_used(cluster: ClusterSpec, deployment: DeploymentSpec) -> int:
    return math.ceil(deployment.num_devices / cluster.devices_per_node)


def gib(gigabytes: float) -> float:
    """GB (1e9 bytes, as specs give host memory) in GiB (what engine flags take)."""
    return gigabytes * 1e9 / 2**30


# --- the header and the script ----------------------------------------------------------------


def deployment_summary(deployment: DeploymentSpec) -> str:
    """One line: replicas, layouts, scheduling and memory options (deterministic)."""
    p, d = deployment.prefill, deployment.decode
    parts = [f"dp {deployment.dp}"]
    if deployment.resharding:
        parts += [f"prefill tp {p.tp} pp {p.pp}", f"decode tp {d.tp} pp {d.pp} (re-shards)"]
    else:
        parts.append(f"tp {p.tp} pp {p.pp} (static)")
    parts.append(f"scheduler {deployment.scheduler}")
    if deployment.scheduler == "sarathi":
        parts.append(f"chunk {deployment.chunk_size}")
    parts += [
        f"max seqs {deployment.max_num_seqs}",
        f"max batched tokens {deployment.max_batched_tokens}",
        f"block {deployment.block_size} tokens",
        f"gpu memory utilization {deployment.gpu_memory_utilization:g}",
        f"preemption {deployment.preemption}",
    ]
    if deployment.cpu_kv_buffer_GB:
        parts.append(f"cpu kv buffer {deployment.cpu_kv_buffer_GB:g} GB")
    return ", ".join(parts)


def serving_header(title: str, model: TransformerSpec, cluster: ClusterSpec, deployment: DeploymentSpec,
                   approx: Approximations | None) -> str:
    """`base.comment_block` for a deployment."""
    return comment_block(title, model, cluster, f"deployment {deployment.name or '(unnamed)'}",
                         deployment_summary(deployment), approx)


def comment(text: str, indent: str = "") -> str:
    """`text` as wrapped `# ` comment lines; list items ("  - ") hang under their dash."""
    hang = "    " if text.startswith("  - ") else "  "
    wrapped = textwrap.wrap(
        text, WIDTH - len(indent), subsequent_indent=hang,
        break_long_words=False, break_on_hyphens=False,
    ) or [""]
    return "".join(f"{indent}# {w}".rstrip() + "\n" for w in wrapped)


def serving_script(
    title: str,
    model: TransformerSpec,
    cluster: ClusterSpec,
    deployment: DeploymentSpec,
    approx: Approximations,
    program: str,
    args: Sequence[Flag],
    model_path: str | None,
    notes: Sequence[str] = (),
    env: Sequence[str] = (),
) -> str:
    """The whole script: header, notes, MODEL, the ARGS array, and one exec of `program`.

    `program` is shell text that may use "$MODEL"; `env` lines set defaults before it runs.
    """
    if model_path is None:
        model_note = (f"MODEL: {model.name!r} is simtune's name for the model: replace it with a "
                      "Hugging Face id or a local path to the weights.")
        value = model.name
    else:
        model_note, value = "MODEL: the weights to serve.", model_path
    return (
        "#!/usr/bin/env bash\n"
        + serving_header(title, model, cluster, deployment, approx)
        + "".join(comment(n) for n in notes)
        + comment("Arguments given to this script are passed on (e.g. --port 8000).")
        + SHELL_PROLOGUE
        + "".join(f"{line}\n" for line in env)
        + "\n" + comment(model_note) + f"MODEL={shlex.quote(value)}\n\n"
        + "ARGS=(\n"
        + "".join((comment(a.note, "    ") if a.note else "") + f"    {a.line()}\n" for a in args)
        + ")\n"
        + f'exec {program} {expand("ARGS")} "$@"\n'
    )


# --- rendering and writing --------------------------------------------------------------------


def render_serving(
    model: TransformerSpec,
    cluster: ClusterSpec,
    deployment: DeploymentSpec,
    engines: Iterable[str],
    model_path: str | None = None,
) -> list[LaunchFile]:
    """Each engine's script and `deployment.yaml`, in memory, paths relative to the output folder."""
    from executor.launch import sglang, vllm  # they import this module's helpers

    writers = {"vllm": vllm.write, "sglang": sglang.write}
    names = engine_names(engines, ENGINES)
    check_even_split(deployment, model)
    validate_deployment(deployment, model, cluster)
    files: dict[Path, LaunchFile] = {}
    for name in names:
        for f in writers[name](model, cluster, deployment, model_path):
            files.setdefault(f.path, f)
    text = serving_header("deployment.yaml (read by simtune)", model, cluster, deployment, None)
    text += yaml.safe_dump(deployment.to_dict(), sort_keys=False)
    spec = LaunchFile("simtune", Path("deployment.yaml"), text)
    return [*files.values(), spec]


def check_even_split(deployment: DeploymentSpec, model: TransformerSpec) -> None:
    """vLLM and SGLang split the query heads, the K/V heads (or replicate them) and the MLP
    evenly over tp; the uneven splits the simulator and simtune's own engine allow (whole GQA
    groups, 2 + 1 on tp 2) have no launch file. Raises SpecError naming the phase's tp."""
    heads, kv, ffn = model.num_attention_heads, model.num_kv_heads, model.ffn_hidden_size
    for phase in ("prefill", "decode"):
        tp = getattr(deployment, phase).tp
        if heads % tp or ffn % tp or (kv % tp and tp % kv):
            raise SpecError(f"deployment.{phase}.tp", tp,
                            f"vLLM and SGLang need an even split: tp must divide num_attention_heads = {heads} "
                            f"and ffn_hidden_size = {ffn} of {model.name}, and divide or be a multiple of "
                            f"num_kv_heads = {kv} (uneven splits run on simtune's own engine: simtune serve)")


def emit_serving_configs(
    model: TransformerSpec,
    cluster: ClusterSpec,
    deployment: DeploymentSpec,
    engines: Iterable[str],
    out_dir: str | Path,
    model_path: str | None = None,
) -> list[LaunchFile]:
    """Write each serving engine's script and `deployment.yaml` into `out_dir`.

    Returns the files with their final paths. Unknown engine names and deployments that do
    not fit the model or cluster raise SpecError before anything is written.
    """
    return write_files(render_serving(model, cluster, deployment, engines, model_path), out_dir)
