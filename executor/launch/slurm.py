"""Slurm: `job.slurm`, an SBATCH script that runs the torchrun command once per node.

One task per node, each running torchrun over the node's devices; the first host of the
allocation is the rendezvous endpoint. Each rank runs simtune's training executor on
`plan.yaml`, as for torchrun (`torchrun.program`).
"""

from __future__ import annotations

import re
from pathlib import Path

from executor.launch.base import Approximations, LaunchFile, header
from executor.launch.torchrun import SHELL_PROLOGUE, program, runs, torchrun_command
from simulator.specs.hardware import ClusterSpec
from simulator.specs.model import TransformerSpec
from simulator.specs.plan import TrainingPlan

ENGINE = "slurm"
CPUS_PER_DEVICE = 8  # the cluster spec does not say; a common share on GPU nodes


def write(
    model: TransformerSpec, cluster: ClusterSpec, plan: TrainingPlan, script: str | None = None
) -> list[LaunchFile]:
    command, files = program(model, cluster, plan, ENGINE, script)
    approx = Approximations("Slurm")  # stays empty: the plan file carries every feature
    job = "simtune-" + re.sub(r"[^A-Za-z0-9._-]", "-", model.name)
    sbatch = {
        "job-name": job,
        "nodes": cluster.num_nodes,
        "ntasks-per-node": 1,
        "gpus-per-node": cluster.devices_per_node,
        "cpus-per-task": CPUS_PER_DEVICE * cluster.devices_per_node,
        "exclusive": None,
        "output": "%x-%j.out",
    }
    text = (
        "#!/usr/bin/env bash\n"
        + header(f"Slurm (srun + torchrun {runs(script)})", model, cluster, plan, approx)
        + "".join(f"#SBATCH --{k}" + ("" if v is None else f"={v}") + "\n" for k, v in sbatch.items())
        + f"# cpus-per-task assumes {CPUS_PER_DEVICE} cores per device: adjust to your nodes.\n\n"
        + SHELL_PROLOGUE
        + "# awk reads all of scontrol's output, so pipefail sees no SIGPIPE (head would close early)\n"
        + 'MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | awk "NR == 1")\n'
        + "export MASTER_ADDR\n"
        + 'export MASTER_PORT="${MASTER_PORT:-29500}"\n\n'
        + "srun "
        + torchrun_command(cluster, command)
    )
    job_file = LaunchFile(ENGINE, Path("job.slurm"), text, list(approx), executable=True)
    return [job_file, *files]
