"""One epoch of distributed GNN training (DistDGL's design) on a cluster of machines.

    specs (graph, model, cluster, plan)
      -> partition quality: measured on the graph (a given partition, or the plan's method run
         on a graph small enough to build), or estimated on a generated stand-in (quality.py)
      -> per machine: the counts of one mini-batch (sampling.py: measured by sampling the real
         graph, or expected from the degree statistics), split into owned / cached / remote
      -> per machine: stage times (costs.py): sample, fetch local, fetch remote, compute,
         host-to-device copy, all-reduce, sparse embedding update
      -> the pipeline below gives each machine's iteration time; the slowest sets the pace
      -> GNNReport (report.py); optionally a Chrome trace of a few iterations

Pipeline (an analytic model; every stage is a steady rate, so a discrete-event run adds nothing):
sampler processes (`samplers_per_trainer` > 0) build mini-batches in parallel with the
trainer, so sampling costs the trainer only a stall when the samplers are slower than it
(`max(sample / samplers, trainer)`); without samplers the trainer samples inline. The trainer
pulls the batch's features (DGL 0.5 `train_dist.py`: `load_subtensor` after the sampler hands
over the blocks), computes, and all-reduces. With `pipeline_fetch` the next batch's features
are pulled while this batch computes: the iteration is the slowest of the producers (samplers,
fetch) and the trainer. Trainers all-reduce every iteration, so every iteration lasts as long
as the slowest machine's (DistDGL's server process per machine runs alongside: when serving the
other machines' remote samples and pulls takes longer than all of the above, the iteration waits
for it, `serve`; costs.py), and every trainer runs the same number (DGL's `node_split(...,
force_even=True)` gives each the same number of seeds; a part short of training nodes takes the
rest from other parts, which makes its seeds, and most of their neighborhoods, remote).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from simulator.engine.pipeline_api import TraceEvent
from simulator.engine.trace import write_chrome_trace
from simulator.errors import InfeasiblePlan, SpecError
from simulator.gnn import costs
from simulator.gnn.graph import Graph, build_graph
from simulator.gnn.partition import Partition, partition_graph
from simulator.gnn.quality import PartitionQuality, cached_nodes, estimated_quality, quality_of
from simulator.gnn.report import BREAKDOWN_KEYS, GNNReport, TrainerLoad
from simulator.gnn.sampling import HopCounts, expected_counts, sample_counts, split_counts
from simulator.specs.catalog import load_cluster, load_gnn_model, load_gnn_plan, load_graph
from simulator.specs.gnn import GNNModelSpec, GNNPlan
from simulator.specs.graph import GraphSpec
from simulator.specs.hardware import ClusterSpec

BUILD_MAX_EDGES = 5_000_000
"""A statistical graph up to this many edges is generated and sampled for real; larger ones
take the statistical path (ogbn-products has 124M, ogbn-papers100M 3.2B)."""


@dataclass(frozen=True)
class Prepared:
    """What an epoch's timing needs beyond the plan's process counts: the partition's quality
    and each machine's mini-batch counts (they depend on the partition, the batch size and the
    cache only, so a tuner prepares them once per such triple)."""

    name: str
    dims: tuple[int, int]              # (feature_dim, num_classes)
    train_nodes: int
    num_nodes: int
    quality: PartitionQuality
    counts: list[tuple[HopCounts, float]]
    path: str


def simulate_gnn(graph: Any, model: Any, cluster: Any, plan: Any, partition: Partition | None = None, *,
                 trace_path: str | Path | None = None) -> GNNReport:
    """Predict one training epoch. `graph` is a catalog name, path, mapping, GraphSpec or a built
    `Graph`; `partition` (a `Partition` of that graph, one part per machine) replaces the plan's
    partitioning. Raises SpecError for inconsistent inputs, InfeasiblePlan when the features or
    a mini-batch do not fit in memory."""
    model, cluster, plan = load_gnn_model(model), load_cluster(cluster), load_gnn_plan(plan)
    return simulate_prepared(prepare(graph, model, cluster, plan, partition), model, cluster, plan, trace_path=trace_path)


def prepare(graph: Any, model: Any, cluster: Any, plan: Any, partition: Partition | None = None) -> Prepared:
    """Partition quality and per-machine counts (the first two steps of the module note)."""
    model, cluster, plan = load_gnn_model(model), load_cluster(cluster), load_gnn_plan(plan)
    built, spec = (graph, None) if isinstance(graph, Graph) else (None, load_graph(graph))
    if built is None and (spec.files is not None or partition is not None or spec.num_edges <= BUILD_MAX_EDGES):
        built = build_graph(spec)
    machines = costs.num_machines(cluster)
    _check(built, spec, cluster, partition)
    if built is not None:
        part = partition or partition_graph(built, machines, plan.partition)
        return Prepared(built.name, (built.feature_dim, built.num_classes), int(built.train_nodes.size),
                        built.num_nodes, quality_of(built, part), _measured(built, part, model, plan), "measured")
    quality = estimated_quality(spec, machines, plan.partition)
    return Prepared(spec.name or "graph", (spec.feature_dim, spec.num_classes), spec.num_train_nodes,
                    int(spec.num_nodes), quality, _statistical(spec, quality, model, plan), "statistical")


def simulate_prepared(prep: Prepared, model: GNNModelSpec, cluster: ClusterSpec, plan: GNNPlan, *,
                      trace_path: str | Path | None = None) -> GNNReport:
    """The epoch from prepared counts: stage times, the pipeline, the slowest machine."""
    machines, counts, dims, train = costs.num_machines(cluster), prep.counts, prep.dims, prep.train_nodes
    _check_memory(cluster, plan, model, dims, counts, prep.num_nodes)
    served = served_demand(counts, prep.quality, plan)
    loads = [_trainer_load(p, c, s, served[p], prep.quality, train, model, cluster, plan, dims)
             for p, (c, s) in enumerate(counts)]
    slowest = max(range(machines), key=lambda p: loads[p].iteration_time_s)
    trainers = machines * plan.trainers_per_machine
    iterations = max(1, math.ceil(train / trainers / plan.batch_size_per_trainer))
    iteration_s = loads[slowest].iteration_time_s
    feature_row = dims[0] * plan.feature_bytes
    model_bytes = costs.parameter_count(model, *dims) * costs.FP32
    report = GNNReport(
        graph=prep.name, model=model.name or model.architecture, cluster=cluster.name, machines=machines,
        trainers=trainers, epoch_time_s=iterations * iteration_s, iteration_time_s=iteration_s,
        iterations_per_epoch=iterations, breakdown=_breakdown(loads[slowest].stages_s, plan),
        remote_bytes_per_epoch=iterations * plan.trainers_per_machine * sum(t.remote_bytes_per_iteration for t in loads),
        local_bytes_per_epoch=iterations * plan.trainers_per_machine * feature_row * sum(
            c.input_local + c.input_cached for c, _ in counts),
        allreduce_bytes_per_epoch=iterations * model_bytes * (trainers > 1),
        sampled_nodes_per_layer=counts[slowest][0].nodes, sampled_edges_per_layer=counts[slowest][0].edges,
        candidate_edges_per_layer=counts[slowest][0].candidate_edges,
        trainer_loads=loads, partition=prep.quality.to_dict(), path=prep.path, plan=plan.to_dict())
    if trace_path is not None:
        write_chrome_trace(trace_events(report, slowest), trace_path, "simtune gnn", "machine")
    return report


def _check(built: Graph | None, spec: GraphSpec | None, cluster: ClusterSpec, partition: Partition | None) -> None:
    nodes = built.num_nodes if built is not None else spec.num_nodes
    machines = costs.num_machines(cluster)
    if machines > nodes:
        raise SpecError("cluster.num_nodes", machines, f"machines must be <= the graph's {nodes} nodes")
    if partition is not None and partition.num_parts != machines:
        raise SpecError("partition.num_parts", partition.num_parts,
                        f"must equal the cluster's machines ({machines}): one part per machine")
    if partition is not None and built is not None and partition.parts.size != built.num_nodes:
        raise SpecError("partition.parts", partition.parts.size, f"must map each of the graph's {built.num_nodes} nodes")


def _measured(graph: Graph, part: Partition, model: GNNModelSpec, plan: GNNPlan) -> list[tuple[HopCounts, float]]:
    out = []
    for p in range(part.num_parts):
        cache = cached_nodes(graph, part, p, plan.feature_cache_fraction) if plan.feature_cache_fraction else None
        out.append(sample_counts(graph, part.parts, p, part.num_parts, model.fanouts, plan.batch_size_per_trainer, cache))
    return out


def _statistical(spec: GraphSpec, q: PartitionQuality, model: GNNModelSpec, plan: GNNPlan) -> list[tuple[HopCounts, float]]:
    nodes, edges, candidates = expected_counts(spec, model.fanouts, plan.batch_size_per_trainer)
    mean_cut = q.edge_cut_fraction
    hit = q.hit_rate(plan.feature_cache_fraction)
    out = []
    for p in range(q.num_parts):
        seed_local = min(1.0, q.train_share[p] * q.num_parts)
        out.append((split_counts(nodes, edges, seed_local, q.cut_fraction[p], mean_cut, q.num_parts, hit, candidates), seed_local))
    return out


def _check_memory(cluster: ClusterSpec, plan: GNNPlan, model: GNNModelSpec, dims: tuple[int, int],
                  counts: list[tuple[HopCounts, float]], num_nodes: int) -> None:
    """Features held per machine (own part, cache, or all) in host memory; a GPU trainer's
    batch (input rows and every layer's activations, kept for backward) in device memory."""
    row = dims[0] * plan.feature_bytes + (model.embedding_dim or 0) * costs.FP32 * 3
    machines = costs.num_machines(cluster)
    share = 1.0 if plan.feature_placement == "replicated" else (1 + plan.feature_cache_fraction) / machines
    held = row * num_nodes * share
    host = cluster.host_memory_bytes_per_device * costs.devices_per_machine(cluster)
    if held > 0.8 * host:
        raise InfeasiblePlan(f"features need {held / 2**30:.0f} GiB per machine, host memory is {host / 2**30:.0f} GiB "
                             f"(feature_placement {plan.feature_placement}, cache {plan.feature_cache_fraction:g})")
    if not cluster.host_offload:
        return
    hop = max(counts, key=lambda c: c[0].input_nodes)[0]
    batch = hop.input_nodes * dims[0] * costs.FP32 + sum(n * 3 * model.hidden_size * costs.FP32 for n in hop.nodes[:-1])
    per_device = math.ceil(plan.trainers_per_machine / costs.devices_per_machine(cluster))
    if batch * per_device > 0.9 * cluster.device.memory_bytes:
        raise InfeasiblePlan(f"a mini-batch of {plan.batch_size_per_trainer} seeds needs {batch / 2**30:.1f} GiB of "
                             f"{cluster.device.memory_GiB:g} GiB device memory per trainer")


def asked_demand(counts: HopCounts, plan: GNNPlan) -> costs.Demand:
    """What one trainer asks of the other machines' servers per mini-batch (requests aside)."""
    rows = 0.0 if plan.feature_placement == "replicated" else counts.input_remote
    far = costs.remote_edges(counts.nodes, counts.edges, counts.frontier_remote)
    return costs.Demand(sum(far), sum(counts.frontier_remote), rows)


def served_demand(counts: list[tuple[HopCounts, float]], q: PartitionQuality, plan: GNNPlan) -> list[costs.Demand]:
    """What each machine's server is asked per iteration by the other machines' trainers.

    A trainer's remote requests spread over the other machines alike (a cut edge's far end is
    on any of them), except for its foreign seeds (`1 - seed_local`: taken from parts with more
    training nodes than their trainers' even share, DGL's `node_split(..., force_even=True)`):
    a foreign seed's neighbors stay with its owner with probability 1 - cut, and that traffic
    goes to the parts in proportion to their excess. Counting remote sampled nodes, of a
    trainer's remote traffic the directed share is f (1 - c) / (f (1 - c) + f c (M - 2) / (M - 1)
    + (1 - f) c), f the foreign seed fraction, c the edge cut, M the machines. Plain METIS on a
    graph whose training nodes cluster makes the heavy part the others' hot spot this way
    (DistDGL, arXiv 2010.05337, on ogbn-papers100M); random partitions cut most edges, so their
    few foreign seeds change little."""
    machines = len(counts)
    if machines <= 1:
        return [costs.Demand()]
    tpm, hops = plan.trainers_per_machine, len(counts[0][0].edges)
    excess = [max(0.0, share - 1.0 / machines) for share in q.train_share]
    served = [costs.Demand(requests=(machines - 1) * tpm * (hops + 1))] * machines
    for src, (c, seed_local) in enumerate(counts):
        asked = asked_demand(c, plan) * tpm
        f, c = max(0.0, 1.0 - seed_local), q.edge_cut_fraction
        spread = f * c * (machines - 2) / (machines - 1) + (1 - f) * c
        foreign = f * (1 - c) / (f * (1 - c) + spread) if f > 0 else 0.0
        owners = sum(e for p, e in enumerate(excess) if p != src)
        for p in range(machines):
            if p == src:
                continue
            share = (1 - foreign) / (machines - 1) if owners > 0 else 1.0 / (machines - 1)
            if owners > 0:
                share += foreign * excess[p] / owners
            served[p] = served[p] + asked * share
    return served


def _trainer_load(part: int, counts: HopCounts, seed_local: float, served: costs.Demand, q: PartitionQuality, train: int,
                  model: GNNModelSpec, cluster: ClusterSpec, plan: GNNPlan, dims: tuple[int, int]) -> TrainerLoad:
    tpm, machines = plan.trainers_per_machine, costs.num_machines(cluster)
    per_device = max(1.0, tpm / costs.devices_per_machine(cluster))
    row = dims[0] * plan.feature_bytes
    if plan.feature_placement == "replicated":
        local_rows, remote_rows = counts.input_nodes, 0.0
    else:
        local_rows, remote_rows = counts.input_local + counts.input_cached, counts.input_remote
    layers = costs.layer_costs(model, dims[0], dims[1], counts.nodes, counts.edges)
    block_bytes = sum(counts.edges) * costs.SAMPLED_EDGE_BYTES
    remote_share = remote_rows / max(counts.input_nodes, 1.0)
    far_edges = costs.remote_edges(counts.nodes, counts.edges, counts.frontier_remote)
    stages = {
        "sample": costs.sampling_s(counts, machines, cluster, tpm),
        "fetch_local": costs.fetch_local_s(local_rows * row, cluster, tpm, local_rows),
        "fetch_remote": costs.fetch_remote_s(remote_rows * row, machines - 1, cluster, tpm, remote_rows),
        "compute": _compute_s(cluster, model, layers, per_device, dims, counts),
        "h2d_copy": costs.h2d_s(cluster, counts.input_nodes * dims[0] * costs.FP32 + block_bytes),
        "allreduce": costs.allreduce_grad_s(cluster, plan, costs.parameter_count(model, *dims) * costs.FP32),
        "sparse_update": costs.sparse_update_s(counts.input_nodes, remote_share, model, cluster, plan),
        "serve": costs.serve_s(served, row, machines, cluster),
    }
    for key, stage in (("sample", "sample"), ("fetch_local", "fetch"), ("fetch_remote", "fetch"), ("compute", "compute")):
        stages[key] *= costs.lockstep_factor(cluster, stage)   # Nxcpu's ranks: slower together than alone
    slow = costs.oversubscription(cluster, plan)   # the machine's processes time-share its cores
    for key in ("sample", "fetch_local", "fetch_remote", "serve") + (() if cluster.host_offload else ("compute",)):
        stages[key] *= slow
    sampled_remote = sum(far_edges)
    return TrainerLoad(
        part=part, trainers=tpm, train_nodes=q.train_share[part] * train, seeds_per_epoch=train / (machines * tpm),
        local_seed_fraction=seed_local, input_nodes=counts.input_nodes,
        local_input_fraction=counts.input_local / max(counts.input_nodes, 1.0),
        cached_input_fraction=counts.input_cached / max(counts.input_nodes, 1.0),
        remote_input_fraction=remote_share,
        remote_bytes_per_iteration=remote_rows * row + sampled_remote * costs.SAMPLED_EDGE_BYTES
        + remote_share * counts.input_nodes * (model.embedding_dim or 0) * costs.FP32,
        iteration_time_s=iteration_time(stages, plan), stages_s=stages)


def _compute_s(cluster: ClusterSpec, model: GNNModelSpec, layers: list[costs.LayerCost], per_device: float,
               dims: tuple[int, int], counts: HopCounts) -> float:
    """A mini-batch's compute: from the profile's measured GNN operations where it has them (the
    trainers of a device time-share it), else from FLOPs and bytes (costs.py)."""
    fits = costs.measured_ops(cluster)
    if fits is None or (model.architecture == "gat" and not isinstance(fits.get("gat_attention"), dict)):
        return costs.compute_s(cluster, layers, per_device)
    return per_device * costs.measured_compute_s(fits, model, dims[0], dims[1], counts.nodes, counts.edges)


def iteration_time(stages: dict[str, float], plan: GNNPlan) -> float:
    """The pipeline of the module note, from the stages' un-overlapped durations."""
    return sum(_breakdown(stages, plan).values())


def _breakdown(stages: dict[str, float], plan: GNNPlan) -> dict[str, float]:
    """Critical-path attribution of one iteration: parts that sum to its duration."""
    out = _producer_breakdown(stages, plan)
    out["serve"] = max(0.0, stages.get("serve", 0.0) - sum(out.values()))
    return out


def _producer_breakdown(stages: dict[str, float], plan: GNNPlan) -> dict[str, float]:
    """The trainer and its samplers/prefetch, before the owners' servers are considered: the
    servers run alongside, and the trainer waits for them (`serve`) only when they are slower."""
    out = dict.fromkeys(BREAKDOWN_KEYS, 0.0)
    trainer = {k: stages[k] for k in ("compute", "h2d_copy", "allreduce", "sparse_update")}
    fetch = {k: stages[k] for k in ("fetch_local", "fetch_remote")}
    busy, fetch_s = sum(trainer.values()), sum(fetch.values())
    samplers = plan.samplers_per_trainer
    out.update(trainer)
    if not plan.pipeline_fetch:
        out.update(fetch)
        busy += fetch_s
        if samplers:
            out["stall"] = max(0.0, stages["sample"] / samplers - busy)
        else:
            out["sample"] = stages["sample"]
        return out
    producer = stages["sample"] / samplers if samplers else stages["sample"] + fetch_s
    exposed_fetch = max(0.0, fetch_s - busy) if samplers else 0.0
    for k, v in fetch.items():
        out[k] = exposed_fetch * v / fetch_s if fetch_s else 0.0
    over = max(0.0, producer - busy - exposed_fetch)
    if samplers:
        out["stall"] = over
    else:  # the trainer's prefetch thread samples then fetches: split the excess between the two
        total = stages["sample"] + fetch_s
        out["sample"] = over * stages["sample"] / total if total else 0.0
        for k, v in fetch.items():
            out[k] = over * v / total if total else 0.0
    return out


def trace_events(report: GNNReport, part: int, iterations: int = 4) -> list[TraceEvent]:
    """A few iterations of the machine `part`: the samplers' batches, and the trainer's fetch,
    compute and all-reduce laid out by the pipeline's critical-path breakdown."""
    load = report.trainer_loads[part]
    stages, b, period = load.stages_s, report.breakdown, report.iteration_time_s
    samplers = max(1, report.plan.get("samplers_per_trainer", 0))
    events = []
    for i in range(iterations):
        t = i * period
        events.append(TraceEvent(part, f"sampler {i % samplers}", f"sample batch {i + 1}", t, t + stages["sample"]))
        for key, stream in (("sample", "trainer"), ("stall", "trainer"), ("fetch_local", "trainer"),
                            ("fetch_remote", "trainer"), ("h2d_copy", "trainer"), ("compute", "trainer"),
                            ("sparse_update", "trainer"), ("allreduce", "trainer"), ("serve", "trainer")):
            if b.get(key, 0.0) > 0:
                events.append(TraceEvent(part, stream, key, t, t + b[key], {"iteration": i + 1}))
                t += b[key]
        if stages.get("serve", 0.0) > 0:
            events.append(TraceEvent(part, "server", f"serve peers {i + 1}", i * period, i * period + stages["serve"]))
        if report.plan.get("pipeline_fetch"):
            fetch = stages["fetch_local"] + stages["fetch_remote"]
            events.append(TraceEvent(part, "prefetch", f"fetch batch {i + 2}", i * period, i * period + fetch))
    return events
