"""torchrun: `torchrun.sh`, simtune's own training executor (`simtune run train`) on `plan.yaml`.

Every rank torchrun starts runs `python -m simtune.cli run train --model M --cluster C --plan
plan.yaml`, which builds the plan's layout (executor.training), trains on synthetic data and
reports measured step time and memory beside the prediction. The plan travels whole as YAML
(the schema `simtune simulate train --plan` reads), so nothing is approximated; a plan the
executor cannot run exactly (fp8 GEMMs, fractional offloading: `check_runnable`) is refused
by name rather than written as a script that fails. The model and cluster are passed by
catalog name when that name loads back to the same spec, and as YAML files beside the plan
otherwise. A user's own training script can take the executor's place (`script=`).

Shell arrays are expanded as `${A[@]+"${A[@]}"}`, which `set -u` accepts for an empty array
on every bash (plain `"${A[@]}"` fails there before bash 4.4).
"""

from __future__ import annotations

import shlex
from pathlib import Path

import yaml

from executor.launch.base import Approximations, EngineRefusal, LaunchFile, header
from simulator.errors import SpecError
from simulator.specs.base import Spec
from simulator.specs.catalog import load_cluster, load_model
from simulator.specs.hardware import ClusterSpec
from simulator.specs.model import TransformerSpec
from simulator.specs.plan import TrainingPlan

ENGINE = "torchrun"
SHELL_PROLOGUE = "set -euo pipefail\n"
EXECUTOR = "-m simtune.cli run train"  # torchrun's -m: each rank runs simtune's executor


def array(name: str, args: list[list[str]]) -> str:
    """A bash array assignment, one flag and its values per line."""
    return f"{name}=(\n" + "".join(f"    {shlex.join(a)}\n" for a in args) + ")\n"


def expand(name: str) -> str:
    """Every element of bash array `name`, quoted; empty arrays pass `set -u` on any bash."""
    return f'${{{name}[@]+"${{{name}[@]}}"}}'


def program(model: TransformerSpec, cluster: ClusterSpec, plan: TrainingPlan, engine: str,
            script: str | None) -> tuple[str, list[LaunchFile]]:
    """What torchrun runs (shell-quoted) and the YAML files it reads: simtune's executor, or
    `script` with the same arguments."""
    args, files = spec_files(model, cluster, plan, engine)
    if script is not None:
        return shlex.join([script, *args]), files
    from executor.training.degrees import ParallelDegrees
    from executor.training.parallelize import check_runnable

    try:
        check_runnable(plan, ParallelDegrees.of(plan, cluster))
    except SpecError as err:
        raise EngineRefusal(engine, (
            f"simtune's training executor, which the {engine} script runs, cannot run this plan "
            f"exactly ({err}); Megatron-LM, torchtitan or DeepSpeed files can carry it")) from None
    return f"{EXECUTOR} {shlex.join(args)}", files


def torchrun_command(cluster: ClusterSpec, program: str) -> str:
    """The multi-node torchrun line; `program` is already shell-quoted (script and arguments)."""
    return (
        f"torchrun --nnodes {cluster.num_nodes} --nproc-per-node {cluster.devices_per_node} \\\n"
        '    --rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT" \\\n'
        f"    {program}\n"
    )


def spec_files(
    model: TransformerSpec, cluster: ClusterSpec, plan: TrainingPlan, engine: str
) -> tuple[list[str], list[LaunchFile]]:
    """Script arguments naming model, cluster and plan, and the YAML files they refer to."""
    args: list[str] = []
    files = [_yaml_file(engine, "plan.yaml", plan, model, cluster, plan)]
    for flag, spec, loader in (("--model", model, load_model), ("--cluster", cluster, load_cluster)):
        if _loads_back(loader, spec):
            args += [flag, spec.name]
        else:
            name = f"{flag[2:]}.yaml"
            args += [flag, name]
            files.append(_yaml_file(engine, name, spec, model, cluster, plan))
    return [*args, "--plan", "plan.yaml"], files


def runs(script: str | None) -> str:
    """What the script runs, for its header."""
    return script or "simtune run train"


def write(
    model: TransformerSpec, cluster: ClusterSpec, plan: TrainingPlan, script: str | None = None
) -> list[LaunchFile]:
    command, files = program(model, cluster, plan, ENGINE, script)
    approx = Approximations("torchrun")  # stays empty: the plan file carries every feature
    text = (
        "#!/usr/bin/env bash\n"
        + header(f"torchrun ({runs(script)})", model, cluster, plan, approx)
        + "# Run on every node with MASTER_ADDR set to the first node's address"
        + ("; simtune must be\n# installed there (pip install simtune).\n" if script is None else ".\n")
        + SHELL_PROLOGUE
        + ': "${MASTER_ADDR:=localhost}"\n: "${MASTER_PORT:=29500}"\n\n'
        + torchrun_command(cluster, command)
    )
    sh = LaunchFile(ENGINE, Path("torchrun.sh"), text, list(approx), executable=True)
    return [sh, *files]


def _loads_back(loader, spec: Spec) -> bool:
    try:
        return loader(spec.name) == spec
    except SpecError:
        return False


def _yaml_file(engine, name, spec, model, cluster, plan) -> LaunchFile:
    text = header(f"{name} (read by simtune and the training script)", model, cluster, plan, None)
    text += yaml.safe_dump(spec.to_dict(), sort_keys=False)
    return LaunchFile(engine, Path(name), text)
