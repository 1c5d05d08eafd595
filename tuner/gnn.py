"""GNN tuner: the fastest epoch over DistDGL's knobs, against DistDGL's defaults.

1. Enumerate legal plans (`candidates`): partition method, trainers and samplers per machine,
   seeds per trainer (the global batch, trainers x seeds, at most `max_global_batch`: larger
   batches converge in fewer epochs only up to a point, so the user bounds it; by default the
   baseline's own global batch), feature placement, cache fraction, fetch pipelining.
2. Prepare each (method, batch, cache) once: the partition and the per-machine counts do not
   depend on the process counts or the pipelining (`simulator.gnn.simulate.prepare`).
3. Score every plan (`simulate_prepared`); plans whose features or batch do not fit are
   counted as infeasible. The baseline, DistDGL's defaults (the catalog's `distdgl-default`),
   is one of the candidates whenever it is legal, so the tuned plan is never slower.

Also writes the launch files of the winner (`launch_files`): DGL's `tools/launch.py` command
with its IP config, and the command that runs the plan on simtune's own executor.
"""

from __future__ import annotations

import itertools
import shlex
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from simulator.errors import InfeasiblePlan, SpecError
from simulator.gnn.costs import devices_per_machine, num_machines
from simulator.gnn.graph import Graph, build_graph
from simulator.gnn.partition import METHODS, partition_graph
from simulator.gnn.report import GNNReport
from simulator.gnn.simulate import BUILD_MAX_EDGES, prepare, simulate_prepared
from simulator.specs.catalog import load_cluster, load_gnn_model, load_gnn_plan, load_graph
from simulator.specs.gnn import GNNPlan

Progress = Callable[[str, int, int], None]
BASELINE = "distdgl-default"
TRAINERS = (1, 2, 4, 8)
SAMPLERS = (0, 1, 2, 4, 8)
BATCHES = (250, 500, 1000, 2000, 4000, 8000)
CACHE = (0.0, 0.1, 0.3, 1.0)


@dataclass
class Evaluated:
    plan: GNNPlan
    report: GNNReport

    def to_dict(self) -> dict[str, Any]:
        return {"plan": self.plan.to_dict(), "report": self.report.to_dict()}


@dataclass
class GNNTuneResult:
    best: Evaluated
    baseline: Evaluated | None
    top: list[Evaluated]
    search: dict[str, Any] = field(default_factory=dict)

    @property
    def speedup(self) -> float | None:
        """Baseline epoch time over the tuned plan's."""
        return self.baseline.report.epoch_time_s / self.best.report.epoch_time_s if self.baseline else None

    def to_dict(self) -> dict[str, Any]:
        """The tuner contract (DESIGN.md)."""
        return {"plan": self.best.plan.to_dict(), "report": self.best.report.to_dict(),
                "baselines": {"distdgl": self.baseline and self.baseline.to_dict()},
                "speedup_over_baseline": self.speedup, "search": self.search,
                "top": [{"plan": e.plan.to_dict(), "epoch_time_s": e.report.epoch_time_s} for e in self.top]}


def candidates(cluster: Any, max_global_batch: int) -> Iterator[GNNPlan]:
    """Legal plans, grouped by (method, batch, cache) so each group shares one preparation."""
    machines = num_machines(cluster)
    trainers = [t for t in TRAINERS if not cluster.host_offload or t <= 2 * devices_per_machine(cluster)]
    for method, batch, cache in itertools.product(METHODS, BATCHES, CACHE):
        for tpm, samplers, placement, pipeline in itertools.product(trainers, SAMPLERS, ("partitioned", "replicated"),
                                                                    (False, True)):
            if machines * tpm * batch > max_global_batch or (placement == "replicated" and cache > 0):
                continue
            yield GNNPlan(name="tuned", partition=method, trainers_per_machine=tpm, samplers_per_trainer=samplers,
                          batch_size_per_trainer=batch, feature_placement=placement, feature_cache_fraction=cache,
                          pipeline_fetch=pipeline)


def tune_gnn(graph: Any, model: Any, cluster: Any, *, max_global_batch: int | None = None,
             progress: Progress | None = None, top_n: int = 5) -> GNNTuneResult:
    """The plan with the shortest predicted epoch, DistDGL's defaults, and the search counts."""
    model, cluster = load_gnn_model(model), load_cluster(cluster)
    baseline_plan = load_gnn_plan(BASELINE)
    machines = num_machines(cluster)
    default_bound = machines * baseline_plan.trainers_per_machine * baseline_plan.batch_size_per_trainer
    bound = default_bound if max_global_batch is None else max_global_batch
    if isinstance(bound, bool) or not isinstance(bound, int) or bound < machines:
        raise SpecError("max_global_batch", max_global_batch, f"must be an integer >= the machines ({machines}): "
                        "at least one seed per trainer")
    g = _graph(graph)
    partitions = {m: partition_graph(g, machines, m) for m in METHODS} if isinstance(g, Graph) else {}
    start = time.perf_counter()
    plans = list(candidates(cluster, bound))
    if default_bound <= bound:
        plans.append(baseline_plan)
    prepared: dict[tuple, Any] = {}
    scored: list[Evaluated] = []
    infeasible = 0
    for n, plan in enumerate(plans):
        key = (plan.partition, plan.batch_size_per_trainer, plan.feature_cache_fraction)
        if key not in prepared:
            prepared[key] = prepare(g, model, cluster, plan, partitions.get(plan.partition))
        try:
            scored.append(Evaluated(plan, simulate_prepared(prepared[key], model, cluster, plan)))
        except InfeasiblePlan:
            infeasible += 1
        if progress and (n % 50 == 0 or n + 1 == len(plans)):
            progress("scoring GNN plans", n + 1, len(plans))
    if not scored:
        raise InfeasiblePlan(f"no plan fits on {cluster.name}: features or mini-batches exceed memory")
    scored.sort(key=lambda e: e.report.epoch_time_s)
    baseline = next((e for e in scored if e.plan is baseline_plan), None)
    seconds = time.perf_counter() - start
    search = {"evaluated": len(plans), "feasible": len(scored), "infeasible": infeasible, "seconds": seconds,
              "evaluations_per_s": len(plans) / max(seconds, 1e-9), "prepared": len(prepared),
              "max_global_batch": bound}
    return GNNTuneResult(scored[0], baseline, scored[:top_n], search)


def _graph(graph: Any) -> Any:
    """A built graph where the simulator would build one anyway (built once for every plan)."""
    if isinstance(graph, Graph):
        return graph
    spec = load_graph(graph)
    if spec.files is not None or spec.num_edges <= BUILD_MAX_EDGES:
        return build_graph(spec)
    return spec


# --- launch files ------------------------------------------------------------------------------


def launch_files(graph_name: str, graph_arg: str, model_arg: str, model: Any, cluster: Any, plan: GNNPlan,
                 part_config: str | None = None) -> dict[str, str]:
    """File name -> text: DGL's launch command and IP config, and simtune's executor command.

    DGL (user guide, "Distributed Training", tools/launch.py): one line per machine in
    `ip_config.txt` (placeholder addresses to replace); `--num_servers 1` per machine as DGL's
    examples run; the training script is DGL's `examples/distributed/graphsage/train_dist.py`,
    whose `--fan_out` lists the input-side layer first (the reverse of simtune's seed-side order).
    """
    model, cluster = load_gnn_model(model), load_cluster(cluster)
    machines = num_machines(cluster)
    part = part_config or f"data/{graph_name}.json"
    fan_out = ",".join(str(f) for f in reversed(model.fanouts))
    train = (f"python3 train_dist.py --graph_name {graph_name} --ip_config ip_config.txt --num_epochs 10 "
             f"--batch_size {plan.batch_size_per_trainer} --fan_out {fan_out} --num_hidden {model.hidden_size} "
             f"--num_layers {model.num_layers}")
    dgl = " \\\n  ".join([
        "python3 tools/launch.py", "--workspace ~/workspace", f"--num_trainers {plan.trainers_per_machine}",
        f"--num_samplers {plan.samplers_per_trainer}", "--num_servers 1", f"--part_config {part}",
        "--ip_config ip_config.txt", shlex.quote(train)])
    ips = "".join(f"172.31.0.{i + 1}\n" for i in range(machines))
    nproc = machines * plan.trainers_per_machine
    simtune = (f"simtune run gnn --graph {shlex.quote(graph_arg)} --model {shlex.quote(model_arg)} "
               f"--plan plan.yaml --nproc {nproc}")
    torchrun = (f"torchrun --nnodes {machines} --nproc_per_node {plan.trainers_per_machine} "
                f"--rdzv_backend c10d --rdzv_endpoint $MASTER_ADDR:29500 -m simtune run gnn "
                f"--graph {shlex.quote(graph_arg)} --model {shlex.quote(model_arg)} --plan plan.yaml --nproc {nproc}")
    header = "#!/usr/bin/env bash\n# generated by simtune tune gnn\nset -euo pipefail\n"
    return {
        "launch_dgl.sh": header + "# DGL: run on the first machine listed in ip_config.txt (replace its placeholder "
                         "addresses)\n" + dgl + "\n",
        "ip_config.txt": ips,
        "run_simtune.sh": header + "# simtune's executor: every trainer on this machine\n" + simtune + "\n"
                          "# across machines: one torchrun per machine, MASTER_ADDR the first machine\n# " + torchrun + "\n",
    }
