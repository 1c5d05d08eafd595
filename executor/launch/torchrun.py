"""torchrun: `torchrun.sh` running a training script on `plan.yaml`, written beside it.

The plan travels whole as YAML (the schema `simtune simulate train --plan` reads), so nothing
is approximated here; the script the command runs decides how much of it to honour. The
model and cluster are passed by catalog name when that name loads back to the same spec, and
as YAML files beside the plan otherwise.
"""

from __future__ import annotations

import shlex
from pathlib import Path

import yaml

from executor.launch.base import Approximations, LaunchFile, header
from simulator.errors import SpecError
from simulator.specs.base import Spec
from simulator.specs.catalog import load_cluster, load_model
from simulator.specs.hardware import ClusterSpec
from simulator.specs.model import TransformerSpec
from simulator.specs.plan import TrainingPlan

ENGINE = "torchrun"
SHELL_PROLOGUE = "set -euo pipefail\n"


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


def write(
    model: TransformerSpec, cluster: ClusterSpec, plan: TrainingPlan, script: str = "train.py"
) -> list[LaunchFile]:
    args, files = spec_files(model, cluster, plan, ENGINE)
    approx = Approximations("torchrun")  # stays empty: the plan file carries every feature
    text = (
        "#!/usr/bin/env bash\n"
        + header(f"torchrun ({script})", model, cluster, plan, approx)
        + "# Run on every node with MASTER_ADDR set to the first node's address.\n"
        + SHELL_PROLOGUE
        + ': "${MASTER_ADDR:=localhost}"\n: "${MASTER_PORT:=29500}"\n\n'
        + torchrun_command(cluster, shlex.join([script, *args]))
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
