"""run_gnn: train a GNN for real on this machine's CPU ranks and measure it against the simulator.

    specs (graph, model, plan), nproc, a partition directory or none
      -> checks: the model's layers exist here, the partition has nproc parts of this graph,
                 with features and labels                       (SpecError naming the field)
      -> no directory: build the graph, partition it with the plan's method into nproc parts,
                 write the store into a temporary directory (simulator.gnn.store)
      -> nproc gloo ranks (run_ranks, one thread each: the Nxcpu cluster's one-core ranks)
           rank r: part r -> sampler, feature store, seeded model -> epochs (executor.gnn.rank)
      -> GNNRunReport (+ the simulator's prediction on Nxcpu and the error with compare)

One trainer per part: rank r is the machine that owns part r. The plan's
`trainers_per_machine` is therefore not used (a run of N ranks is N machines of one trainer);
the prediction is asked for the same shape.

Measured numbers:
- `epoch_time_s`: the median over the epochs after the first (the first one, which warms the
  allocator and the groups, is dropped when there is more than one) of the slowest rank's
  wall time from a barrier to its last optimizer step; evaluation is not in it.
- `breakdown`: seconds per epoch of each part of the slowest rank in those epochs (median):
  `sample` (including the all-to-alls that ask owners to sample their rows), `fetch_local`
  (reading owned and cached rows), `fetch_remote` (the all-to-alls of ids and rows),
  `compute` (forward, backward, optimizer step), `allreduce` (gradients), `stall` (the trainer
  waiting for a batch sampled or fetched ahead in a thread; those threads' own time is in
  sample/fetch). Without threads the parts add up to the epoch but for loop overhead.
- `remote_bytes_per_epoch`: feature bytes received from other ranks, summed over ranks;
  `sampling_bytes_per_epoch`: bytes of sampling requests and answers between ranks.
- accuracy per epoch on the validation and test nodes of all ranks.
"""

from __future__ import annotations

import statistics
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from executor.gnn.model import check_model
from executor.gnn.rank import TIMED_PARTS, GNNJob, train_gnn_rank
from profiler.ranks import run_ranks
from profiler.store import machine_meta, this_machines_profile
from simulator.errors import SpecError
from simulator.gnn.graph import Graph, build_graph
from simulator.gnn.partition import Partition, partition_graph
from simulator.gnn.store import read_metadata, write_partition
from simulator.specs.catalog import load_gnn_model, load_gnn_plan, load_graph
from simulator.specs.gnn import GNNModelSpec, GNNPlan
from simulator.specs.graph import GraphSpec


@dataclass
class GNNRunReport:
    """Measured (and, with compare, predicted) numbers of one distributed GNN training run."""

    graph: str
    model: str
    plan: dict[str, Any]
    nproc: int
    epochs: int
    cluster: str                                   # Nxcpu: what the prediction is asked for
    partition: dict[str, Any]                      # method, dir, edge cut, halo and balance
    backend: str = "gloo"
    launcher: str = "spawn"
    iterations_per_epoch: int = 0
    epoch_time_s: float | None = None              # median of the slowest rank, first epoch dropped
    iteration_time_s: float | None = None
    epoch_times_s: list[float] = field(default_factory=list)   # slowest rank, every epoch
    core_share: list[float] = field(default_factory=list)      # per rank: CPU s / wall s over timed epochs
    breakdown: dict[str, float] = field(default_factory=dict)  # seconds per epoch, slowest rank
    breakdown_per_rank: list[dict[str, float]] = field(default_factory=list)
    remote_bytes_per_epoch: float = 0.0            # feature rows received from other ranks, all ranks
    remote_rows_per_epoch: float = 0.0
    sampling_bytes_per_epoch: float = 0.0
    input_nodes_per_batch: float = 0.0             # mean over ranks and batches
    losses: list[float] = field(default_factory=list)               # per epoch, mean over ranks
    val_accuracy: list[float | None] = field(default_factory=list)  # per epoch
    test_accuracy: list[float | None] = field(default_factory=list)
    ranks: list[dict[str, int]] = field(default_factory=list)      # owned, train, halo, cached nodes
    predicted_epoch_time_s: float | None = None
    predicted_iteration_time_s: float | None = None
    predicted_iterations_per_epoch: int | None = None
    predicted_breakdown: dict[str, float] = field(default_factory=dict)  # seconds per epoch, as `breakdown`
    predicted_remote_bytes_per_epoch: float | None = None
    profile: str | None = None
    error: float | None = None                     # measured / predicted epoch time - 1
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def run_gnn(graph: Any, model: Any, plan: Any, nproc: int, epochs: int = 3, seed: int = 0, *,
            partition_dir: str | Path | None = None, compare: bool = False, profile: str | Path | None = None,
            evaluate: bool = True, timeout_s: float = 600.0) -> GNNRunReport:
    """Train `model` on `graph` with `plan` on `nproc` gloo ranks for `epochs` epochs.

    Each spec argument is a spec, a catalog name, a path or a mapping. `partition_dir` is a
    directory `simtune partition --out` wrote (nproc parts of this graph); without one the graph
    is partitioned with the plan's method into a temporary directory. `compare` (or `profile`)
    adds the simulator's prediction on the `{nproc}xcpu` cluster with `profile` (default: the
    committed profile of this machine's CPU, `profiler.store.this_machines_profile`, else the
    cluster's own). Raises SpecError for inputs that cannot run,
    `RankError` naming the rank when a rank fails, TimeoutError past `timeout_s`.
    """
    graph_spec, model_spec, plan_spec = load_graph(graph), load_gnn_model(model), load_gnn_plan(plan)
    check_model(model_spec)
    if isinstance(nproc, bool) or not isinstance(nproc, int) or nproc < 1:
        raise SpecError("nproc", nproc, "must be an integer >= 1 (one trainer rank per part)")
    if epochs < 1:
        raise SpecError("epochs", epochs, "must be >= 1")
    with tempfile.TemporaryDirectory(prefix="simtune-gnn-") as tmp:
        built: tuple[Graph, Partition] | None = None
        if partition_dir is None:
            built = _partition_now(graph_spec, plan_spec, nproc, seed, Path(tmp) / "partition")
            partition_dir = Path(tmp) / "partition"
        meta = check_partition(partition_dir, graph_spec, nproc)
        report = GNNRunReport(
            graph=meta["graph_name"], model=model_spec.name or model_spec.architecture,
            plan=plan_spec.to_dict(), nproc=nproc, epochs=epochs, cluster=f"{nproc}xcpu",
            partition=_partition_summary(meta, None if built is None else partition_dir))
        if meta["method"] != plan_spec.partition:
            report.notes.append(f"the partition directory was made with {meta['method']!r}, the plan "
                                f"says {plan_spec.partition!r}: the run (and any prediction) uses {meta['method']!r}")
        if plan_spec.trainers_per_machine != 1:
            report.notes.append(f"trainers_per_machine = {plan_spec.trainers_per_machine} not used: one "
                                "trainer rank per part")
        job = GNNJob(str(partition_dir), model_spec, plan_spec, epochs, seed, evaluate)
        results = run_ranks(train_gnn_rank, nproc, "gloo", 1, (job,), timeout_s)
        _summarize(report, results)
        if compare or profile is not None:
            graph_obj, partition = built or _stored(graph_spec, partition_dir, meta)
            _predict(report, graph_obj, model_spec, plan_spec, partition, profile)
    return report


def _partition_now(spec: GraphSpec, plan: GNNPlan, nproc: int, seed: int, out: Path) -> tuple[Graph, Partition]:
    graph = build_graph(spec)
    partition = partition_graph(graph, nproc, plan.partition, seed=seed)
    write_partition(out, graph, partition)
    return graph, partition


def check_partition(partition_dir: str | Path, graph: GraphSpec, nproc: int) -> dict[str, Any]:
    """The partition's metadata, once it is known to fit the run: nproc parts of this graph,
    with features and labels to learn from."""
    meta = read_metadata(partition_dir)
    if meta["num_parts"] != nproc:
        raise SpecError("nproc", nproc, f"must equal the partition's part count ({meta['num_parts']} in "
                        f"{partition_dir}): one trainer rank per part")
    if graph.name is not None and meta["graph_name"] != graph.name:
        raise SpecError("partition", str(partition_dir), f"holds graph {meta['graph_name']!r}, not "
                        f"{graph.name!r}; partition this graph with `simtune partition --out DIR`")
    if not meta.get("feature_dim"):
        raise SpecError("graph", meta["graph_name"], "has no node features; the GNN executor trains on features "
                        "(a generated graph needs feature_dim > 0)")
    if not meta.get("num_classes") or "labels" not in meta["parts"][0]["files"]:
        raise SpecError("graph", meta["graph_name"], "has no node labels to train on")
    return meta


def _partition_summary(meta: dict[str, Any], directory: Path | None) -> dict[str, Any]:
    return {"method": meta["method"], "dir": None if directory is None else str(directory),
            "edge_cut_fraction": meta["edge_cut_fraction"], "balance": meta["balance"],
            "halo_nodes": [p["halo_nodes"] for p in meta["parts"]]}


def _summarize(report: GNNRunReport, results: list[dict[str, Any]]) -> None:
    epochs = report.epochs
    timed = list(range(1, epochs)) if epochs > 1 else [0]
    slowest = [max(results, key=lambda r: r["epochs"][e]["epoch_time_s"]) for e in range(epochs)]
    report.iterations_per_epoch = results[0]["iterations_per_epoch"]
    report.epoch_times_s = [slowest[e]["epochs"][e]["epoch_time_s"] for e in range(epochs)]
    report.epoch_time_s = statistics.median(report.epoch_times_s[e] for e in timed)
    report.iteration_time_s = report.epoch_time_s / report.iterations_per_epoch
    report.breakdown = {k: statistics.median(slowest[e]["epochs"][e]["breakdown"][k] for e in timed)
                        for k in TIMED_PARTS}
    report.breakdown_per_rank = [{k: statistics.median(r["epochs"][e]["breakdown"][k] for e in timed)
                                  for k in TIMED_PARTS} for r in results]

    def per_epoch(key: str) -> float:
        return statistics.median(sum(r["epochs"][e][key] for r in results) for e in timed)

    report.remote_bytes_per_epoch = per_epoch("remote_bytes")
    report.remote_rows_per_epoch = per_epoch("remote_rows")
    report.sampling_bytes_per_epoch = per_epoch("sampling_bytes")
    report.input_nodes_per_batch = float(np.mean([r["epochs"][e]["input_nodes_per_batch"]
                                                  for r in results for e in timed]))
    report.losses = [float(np.mean([r["epochs"][e]["loss"] for r in results])) for e in range(epochs)]
    report.val_accuracy = [results[0]["epochs"][e].get("val_accuracy") for e in range(epochs)]
    report.test_accuracy = [results[0]["epochs"][e].get("test_accuracy") for e in range(epochs)]
    report.ranks = [{k: r[k] for k in ("owned_nodes", "train_nodes", "halo_nodes", "cached_nodes")}
                    for r in results]
    # a rank that computed on a core of its own the whole epoch has a share near 1 (less when it
    # waits on a peer); other processes on the machine's cores push it down
    report.core_share = [sum(r["epochs"][e]["cpu_time_s"] for e in timed)
                         / sum(r["epochs"][e]["epoch_time_s"] for e in timed) for r in results]


def _stored(spec: GraphSpec, partition_dir: str | Path, meta: dict[str, Any]) -> tuple[Graph, Partition]:
    """The graph and the partition a directory holds, as the simulator takes them."""
    graph = build_graph(spec)
    halo = [np.load(Path(partition_dir) / p["files"]["halo"]) for p in meta["parts"]]
    partition = Partition(method=meta["method"], num_parts=meta["num_parts"],
                          parts=np.load(Path(partition_dir) / meta["node_map"]), halo=halo,
                          edge_cut=meta["edge_cut"], edge_cut_fraction=meta["edge_cut_fraction"],
                          loads=meta["loads"], balance=meta["balance"], seconds=0.0)
    return graph, partition


def _predict(report: GNNRunReport, graph: Graph, model: GNNModelSpec, plan: GNNPlan, partition: Partition,
             profile: str | Path | None) -> None:
    """The simulator's epoch on `{nproc}xcpu` for the plan as it ran (one trainer per part)."""
    try:
        from simulator.gnn.simulate import simulate_gnn
    except ImportError:
        report.notes.append("no prediction: this version has no GNN simulator (simulator.gnn.simulate)")
        return
    from simulator.specs.catalog import load_cluster

    if profile is None and (profile := this_machines_profile()) is None:
        report.notes.append(f"no committed profile of this CPU ({machine_meta('cpu', 1)['name']}): predicted with "
                            f"{report.cluster}'s own, measured on another machine")
    cluster = load_cluster(report.cluster, profile)
    ran = plan.model_copy(update={"trainers_per_machine": 1, "partition": partition.method})
    predicted = simulate_gnn(graph, model, cluster, ran, partition=partition)
    report.profile = str(profile) if profile is not None else cluster.profile
    report.predicted_epoch_time_s = predicted.epoch_time_s
    report.predicted_iteration_time_s = predicted.iteration_time_s
    report.predicted_iterations_per_epoch = predicted.iterations_per_epoch
    # the simulator's breakdown is of one iteration's critical path; per epoch like the measurement
    report.predicted_breakdown = {k: v * predicted.iterations_per_epoch for k, v in predicted.breakdown.items()}
    report.predicted_remote_bytes_per_epoch = predicted.to_dict().get("remote_bytes_per_epoch")
    if report.epoch_time_s is not None:
        report.error = report.epoch_time_s / predicted.epoch_time_s - 1.0
