"""Per-iteration costs of one trainer: sampling, feature fetch, GNN compute, gradient sync.

Each function turns counts (nodes, edges, bytes) into seconds on the cluster's hardware. The
layer formulas count one multiply-add as 2 FLOPs and one aggregation add as 1 FLOP; training
costs 3x the forward GEMMs (forward, input gradient, weight gradient) and 2x the aggregation
(forward, and its transpose backward), except that the input layer needs no input gradient.

- GraphSAGE-mean (Hamilton et al., NeurIPS 2017; DGL `SAGEConv`): mean of the neighbors, then
  `fc_self(h_dst) + fc_neigh(mean)`: 2 GEMMs of dst x d_in x d_out.
- GCN (Kipf & Welling, ICLR 2017; DGL `GraphConv`): one GEMM, done before aggregating when it
  shrinks the width (DGL's order: weight first if d_in > d_out), so the cheaper order counts.
- GAT (Velickovic et al., ICLR 2018; DGL `GATConv`): a GEMM on every source node, two
  attention projections per node, per edge and head a score, leaky ReLU, softmax (about 6
  FLOPs), and the weighted aggregation of d_out values.

Constants that are physics, not fits, and where they come from:

- `SAMPLE_EDGE_S`: one sampled edge costs a random read of the neighbor list plus a random
  number: about one DRAM access, ~100 ns on a two-socket Xeon (Intel MLC idle latency ~80-90 ns
  local, more remote).
- `SAMPLE_NODE_S`: each unique node of a hop is inserted into the hash table that relabels ids
  into the block (DGL `to_block`) and its neighbor list located: about two DRAM accesses.
- `RPC_ROUND_TRIP_S`: a request of DGL's RPC layer (`dgl.distributed.rpc`: Python, a pickled
  request over TCP, a server thread) takes about a millisecond round trip; one per remote
  machine per hop, issued in parallel.
- `RPC_STREAM_BYTES_PER_S`: assumed rate at which one trainer process receives RPC replies
  (DGL's RPC: one receiving socket thread per process, copying through the kernel):
  1.25 GB/s, the order of what one TCP stream driven by one thread sustains, and the
  10 Gb/s single-flow limit AWS documents inside a cluster placement group ("Amazon EC2
  instance network bandwidth"). A trainer's remote pulls run at the smaller of this and its
  share of the machine's network interface.
- `HOST_GATHER_BYTES_PER_S`: on GPU machines the features live in host memory, which the spec
  does not describe; one process gathering random 0.5 KB rows reaches about 20 GB/s of a
  socket's DDR4 bandwidth.
- `KERNELS_PER_LAYER`: operator launches per layer forward and backward (DGL message passing,
  linear layers, activation, dropout): each pays the device's `kernel_overhead_us`.

DistDGL's processes on a machine whose cores the cluster spec gives (`host_cores_per_node`,
`host_vcpus_per_node`; DGL 0.5 `tools/launch.py` and `dgl/distributed`):

- **one server process** per machine (`--num_servers 1`) owns the machine's partition and answers
  every remote request of the other machines' samplers and trainers in one loop
  (`rpc_server.py`: receive a request, `process_request`, send the response). For a remote
  sampling request it draws the neighbors and maps them to global ids (two random DRAM accesses
  per edge, `SERVER_EDGE_S`) and returns (src, dst, eid) as int64 (`RESPONSE_EDGE_BYTES`); for
  a KVStore pull it gathers the rows and serialises them (two copies of every byte at one
  core's copy rate). Every request also costs Python-level handling (`SERVER_REQUEST_S`). The
  machines' requests are symmetric on average, so a server serves as much as its own machine's
  trainers ask of the others (`serve_s`). It runs alongside the trainers; when it is slower, the
  trainers wait for it (the `serve` part of the breakdown). Part of why METIS wins: fewer remote
  frontier nodes means fewer remote samples and pulls for these single servers.
- **trainers** run PyTorch with `OMP_NUM_THREADS = vCPUs // 2 // trainers` (launch.py's
  default), so all trainers together get half the hardware threads; two hyperthreads share one
  core's FMA units, so a trainer computes at `threads * cores / vCPUs` cores' peak.
- **samplers** (`samplers_per_trainer` per trainer) each keep one core busy.
- When trainers, samplers and the server ask for more cores than the machine has, every CPU
  stage slows by the oversubscription (`oversubscription`): time-sharing.
- `CORE_COPY_BYTES_PER_S`: what one core copies: Little's law on its outstanding cache-line
  misses, 12 line fill buffers x 64 B per ~90 ns DRAM latency = 8.5 GB/s (Intel optimization
  manual, Skylake-SP microarchitecture: 12 fill buffers; latency as for `SAMPLE_EDGE_S`): 8 GB/s.
  Deserialising, scattering received rows and serialising responses run at this rate.

A cluster without core counts (`Nxcpu`: one-core ranks of simtune's own executor, which answer
their peers' pulls themselves through all-to-alls) keeps the simpler layout: the owners' gather
is charged to the requesting trainer's remote fetch and no server or core sharing is modelled.

Measured operation costs (a profile's `gnn` family, `profiler/gnn.py`): where the cluster's
profile timed simtune's GNN executor's own operations on its device, a batch is priced from
them instead of from FLOPs and bytes (`measured_compute_s`, `measured_sample_s`): per layer the
two (GraphSAGE) or one (GCN) linear layers, the sparse mean aggregation (building the sparse
matrix and its product, forward and backward), ReLU and dropout between layers, and per batch
the optimizer's step; per hop the sampler's draw and the block's relabelling. Each cost is the
linear model `OP_TERMS` names, the same terms the profiler fits. GAT layers are priced so when
the profile timed `gat_attention` too (older profiles did not: GAT then keeps the FLOP-based
model). Feature rows are priced by the profile's `fetch` (the executor's `FeatureStore.fetch`:
a random gather of rows, per row and per element) where it has one: locally for the owned and
cached rows, and twice for a remote row (the owner's gather, the requester's scatter into the
batch) besides the exchange and the bytes on the link.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from simulator.costs.comm import Link, allreduce_s
from simulator.costs.timing import gemm_efficiency
from simulator.gnn.sampling import HopCounts
from simulator.specs.gnn import GNNModelSpec, GNNPlan
from simulator.specs.hardware import ClusterSpec

SAMPLE_EDGE_S = 100e-9
SAMPLE_NODE_S = 200e-9
RPC_ROUND_TRIP_S = 1e-3
RPC_STREAM_BYTES_PER_S = 1.25e9
HOST_GATHER_BYTES_PER_S = 20e9
KERNELS_PER_LAYER = 30
SAMPLED_EDGE_BYTES = 16       # (src, dst) int64 ids of one sampled edge in a block
RESPONSE_EDGE_BYTES = 24      # (src, dst, eid) int64 of one sampled edge in a server's response
ID_BYTES = 8                  # one int64 node id in a request
FP32 = 4
CORE_COPY_BYTES_PER_S = 8e9
SERVER_EDGE_S = 2 * SAMPLE_EDGE_S
SERVER_REQUEST_S = 100e-6
SERVERS_PER_MACHINE = 1


OP_TERMS: dict[str, tuple[str, ...]] = {
    "sample": ("s_per_edge", "s_per_candidate", "s_per_sorted_candidate", "s_per_row", "overhead_s"),
    "to_block": ("s_per_id", "s_per_sorted_id", "s_per_node", "overhead_s"),
    "aggregate": ("s_per_edge_element", "s_per_far_edge_element", "s_per_edge", "s_per_node_element", "overhead_s"),
    "aggregate_input": ("s_per_edge_element", "s_per_far_edge_element", "s_per_edge", "s_per_node_element",
                        "overhead_s"),
    "linear": ("s_per_flop", "s_per_element", "overhead_s"),
    "linear_input": ("s_per_flop", "s_per_element", "overhead_s"),
    "relu_dropout": ("s_per_element", "overhead_s"),
    "optimizer": ("s_per_param", "overhead_s"),
    "gat_attention": ("s_per_edge_head", "s_per_edge_element", "s_per_node_element", "overhead_s"),
    "fetch": ("s_per_row", "s_per_element", "overhead_s"),
}
"""The cost model of each operation of the profile's `gnn` family: seconds = sum of coefficient x term."""
OPTIONAL_OPS = ("gat_attention", "fetch")
LOCKSTEP_STAGES = {"sample": ("sample", "to_block"), "fetch": ("fetch",),
                   "compute": ("aggregate", "aggregate_input", "linear", "linear_input", "relu_dropout", "optimizer",
                               "gat_attention")}
"""The operations whose lock-step ratios (profiler/gnn.py) price each stage of `Nxcpu`'s ranks."""
CACHE_BYTES_GRID = (0.5 * 2**20, 2**20, 2 * 2**20, 4 * 2**20, 8 * 2**20, 16 * 2**20)
"""Candidate sizes of the cache the aggregation's source rows fall out of: the profiler keeps
the one whose fit cross-validates best (`cache_bytes` in the aggregate ops' fits)."""


def far_share(src: float, width: float, cache_bytes: float) -> float:
    """Share of an aggregation's random source-row reads that miss a cache of `cache_bytes`:
    the source rows (src x width fp32) beyond what the cache holds."""
    table = src * width * FP32
    return max(0.0, 1.0 - cache_bytes / table) if table > 0 and cache_bytes > 0 else 0.0
"""Operations only one architecture needs: a profile without them still prices the others."""


def op_terms(op: str, *, rows: float = 0, src: float = 0, edges: float = 0, width: float = 0, d_out: float = 0,
             elements: float = 0, params: float = 0, cache_bytes: float = 0.0, candidates: float = 0.0
             ) -> tuple[float, ...]:
    """The terms of `op`'s cost model (in OP_TERMS order) for one call. `rows`: frontier nodes
    (sample, to_block), dst nodes (aggregate) or input rows (linear); `src`: a block's source
    nodes; `candidates`: the in-edges of frontier rows with more neighbors than the fan-out,
    which the sampler shuffles (one random key each, one argsort); `width`: feature width (a
    linear layer's input); `d_out`: a linear layer's output;
    `cache_bytes`: the aggregation's cache (its fit's `cache_bytes`): edge reads of rows beyond
    it are the far term, priced apart (a DRAM miss per row, not a cache hit)."""
    if op == "sample":
        return edges, candidates, candidates * math.log2(candidates) if candidates > 1 else 0.0, rows, 1.0
    if op == "to_block":   # np.unique over frontier + neighbors: a sort, n log2 n
        ids = rows + edges
        return ids, ids * math.log2(ids) if ids > 1 else 0.0, src, 1.0
    if op in ("aggregate", "aggregate_input"):
        return edges * width, edges * width * far_share(src, width, cache_bytes), edges, (src + rows) * width, 1.0
    if op in ("linear", "linear_input"):
        return 2.0 * rows * width * d_out, rows * (width + d_out), 1.0
    if op == "relu_dropout":
        return elements, 1.0
    if op == "optimizer":
        return params, 1.0
    if op == "fetch":          # rows x width fp32 elements (a narrower dtype: its fp32-equivalent width)
        return rows, rows * width, 1.0
    if op == "gat_attention":   # width = heads x d_out per head; a self loop per dst node
        heads = width / d_out if d_out else 0.0
        return (edges + rows) * heads, (edges + rows) * width, (src + rows) * width, 1.0
    raise ValueError(f"unknown gnn op {op!r}; known: {', '.join(OP_TERMS)}")


def op_s(fits: dict[str, Any], op: str, **counts: float) -> float:
    """Seconds of one call of `op` from a profile's `gnn` fits."""
    fit = fits[op]
    terms = op_terms(op, cache_bytes=fit.get("cache_bytes", 0.0), **counts)
    return float(sum(fit.get(name, 0.0) * term for name, term in zip(OP_TERMS[op], terms)))


def measured_ops(cluster: ClusterSpec) -> dict[str, Any] | None:
    """The `gnn` fits of the cluster's profile, when it timed every operation a batch needs on
    this device (`DeviceSpec.cost_sources` names 'gnn' once `apply_profile` accepted it)."""
    if "gnn" not in cluster.device.cost_sources or cluster.profile is None:
        return None
    from simulator.specs.profile import load_profile  # noqa: PLC0415 - only profiled clusters read it

    fits = load_profile(cluster.profile).fit("gnn") or {}
    return fits if all(isinstance(fits.get(op), dict) for op in OP_TERMS if op not in OPTIONAL_OPS) else None


def measured_compute_s(fits: dict[str, Any], model: GNNModelSpec, feature_dim: int, num_classes: int,
                       nodes: list[float], edges: list[float]) -> float:
    """Forward, backward and optimizer step of one mini-batch from measured operation costs
    (GraphSAGE-mean, GCN or GAT, as simtune's executor runs them: `executor/gnn/model.py`)."""
    L = model.num_layers
    total = op_s(fits, "optimizer", params=parameter_count(model, feature_dim, num_classes))
    for l, (d_in, d_out) in enumerate(layer_dims(model, feature_dim, num_classes)):
        src, dst, e = nodes[L - l], nodes[L - l - 1], edges[L - l - 1]
        suffix = "_input" if l == 0 else ""   # the input features need no gradient
        if model.architecture == "gcn":       # mean over the neighbors and a self loop, then one linear
            total += op_s(fits, "aggregate" + suffix, rows=dst, src=src, edges=e + dst, width=d_in)
            total += op_s(fits, "linear" + suffix, rows=dst, width=d_in, d_out=d_out)
        elif model.architecture == "gat":     # project every source row, then attend per head
            heads = model.num_heads
            d_head = d_out // heads if l < L - 1 else d_out   # hidden layers concatenate, the last averages
            total += op_s(fits, "linear" + suffix, rows=src, width=d_in, d_out=heads * d_head)
            total += op_s(fits, "gat_attention", rows=dst, src=src, edges=e, width=heads * d_head, d_out=d_head)
        else:                                 # fc_self on the dst nodes, fc_neigh on the mean
            total += op_s(fits, "aggregate" + suffix, rows=dst, src=src, edges=e, width=d_in)
            total += 2 * op_s(fits, "linear" + suffix, rows=dst, width=d_in, d_out=d_out)
        if l < L - 1:
            total += op_s(fits, "relu_dropout", elements=dst * d_out)
    return total


def measured_sample_s(fits: dict[str, Any], nodes: list[float], edges: list[float], candidates: list[float]) -> float:
    """One trainer's sampler work for one mini-batch, hop by hop: the draw over the frontier
    (shuffling the candidate edges of rows above the fan-out) and the relabelling into a block
    (the exchange with the owners is charged apart)."""
    return sum(op_s(fits, "sample", rows=nodes[h], edges=edges[h], candidates=candidates[h])
               + op_s(fits, "to_block", rows=nodes[h], edges=edges[h], src=nodes[h + 1]) for h in range(len(edges)))


@dataclass(frozen=True)
class LayerCost:
    """Training FLOPs of a layer's GEMMs, bytes its aggregation gathers, and its GEMMs' smallest dim."""

    gemm_flops: float
    gather_bytes: float
    min_dim: int


def layer_dims(model: GNNModelSpec, feature_dim: int, num_classes: int) -> list[tuple[int, int]]:
    """(d_in, d_out) per layer from the input side; a learnable embedding widens the input."""
    d0 = feature_dim + (model.embedding_dim or 0)
    widths = [d0] + [model.hidden_size] * (model.num_layers - 1) + [num_classes]
    return list(zip(widths[:-1], widths[1:]))


def layer_costs(model: GNNModelSpec, feature_dim: int, num_classes: int, nodes: list[float],
                edges: list[float]) -> list[LayerCost]:
    """Costs of each layer, input side first; `nodes`/`edges` are per hop from the seeds out."""
    L = model.num_layers
    out = []
    for l, (d_in, d_out) in enumerate(layer_dims(model, feature_dim, num_classes)):
        src, dst, e = nodes[L - l], nodes[L - l - 1], edges[L - l - 1]
        agg_passes = 1 if l == 0 else 2
        gemm_passes = 2 if l == 0 else 3
        if model.architecture == "graphsage":
            flops = 2 * dst * (2 * d_in) * d_out
            gather = e * d_in * FP32
        elif model.architecture == "gcn":
            if d_in > d_out:
                flops, gather = 2 * src * d_in * d_out, e * d_out * FP32
            else:
                flops, gather = 2 * dst * d_in * d_out, e * d_in * FP32
        else:  # gat
            flops = 2 * src * d_in * d_out + 4 * (src + dst) * d_out + 6 * e * model.num_heads
            gather = e * d_out * FP32 * 2    # the weighted rows, and the per-edge scores' pass
        out.append(LayerCost(gemm_passes * flops, agg_passes * gather, min(d_in, d_out)))
    return out


def compute_s(cluster: ClusterSpec, layers: list[LayerCost], trainers_per_device: float) -> float:
    """Forward and backward of one mini-batch on a trainer's share of its device (fp32). On a CPU
    machine with core counts the share is the trainer's cores (`trainer_cores`), its memory
    bandwidth at most those cores' copy rate."""
    d = cluster.device
    share = 1.0 / trainers_per_device
    bandwidth = d.hbm_bandwidth_bytes_per_s * d.efficiency.memory_bound * share
    if has_cores(cluster) and not cluster.host_offload:
        cores = trainer_cores(cluster, round(trainers_per_device))
        share = cores / cluster.host_cores_per_node
        bandwidth = min(bandwidth, cores * CORE_COPY_BYTES_PER_S)
    peak = 1e12 * d.peak_tflops.get("fp32", d.peak_tflops.get("bf16", 0.0)) * share
    total = 0.0
    for layer in layers:
        if layer.gemm_flops:  # none when a layer has no input (a graph without features or embedding)
            total += layer.gemm_flops / (peak * gemm_efficiency(d, layer.min_dim))
        total += layer.gather_bytes / bandwidth
        total += KERNELS_PER_LAYER * d.efficiency.kernel_overhead_us * 1e-6
    return total


def remote_edges(nodes: list[float], edges: list[float], remote_frontier: list[float]) -> list[float]:
    """Sampled edges per hop whose destination another machine owns (its server samples them)."""
    return [r / max(n, 1.0) * e for r, n, e in zip(remote_frontier, nodes, edges)]


EXCHANGE_CALLS = 4
"""Collective calls of one request round of simtune's executor (`executor.gnn.exchange`): an
all-to-all of sizes and one of payload for the request, the same for the answer."""


def exchange_round_s(cluster: ClusterSpec, machines: float) -> float:
    """Latency of one request round without DistDGL's servers (simtune's executor: collectives
    over all ranks, `EXCHANGE_CALLS` all-to-alls): the profile's all-to-all latency for that many
    ranks (the mean of repeated calls: the wait is heavy-tailed on a shared machine, and an
    iteration's calls add up to their mean), else the cluster's collective latency."""
    ranks = max(2, int(machines))
    if cluster.profile is not None and "collectives" in cluster.device.cost_sources:
        from simulator.specs.profile import load_profile  # noqa: PLC0415 - only profiled clusters read it

        fits = load_profile(cluster.profile).fit("collectives") or {}
        backend = "nccl" if cluster.host_offload else "gloo"
        fit = ((fits.get(backend) or {}).get("all_to_all") or {}).get(str(ranks))
        if isinstance(fit, dict) and isinstance(fit.get("alpha_s"), (int, float)):
            return EXCHANGE_CALLS * float(fit["alpha_s"])
    return EXCHANGE_CALLS * Link.of(cluster, "inter_node", ranks).alpha_s


def sampling_s(counts: HopCounts, machines: int, cluster: ClusterSpec, trainers_per_machine: int) -> float:
    """One sampler process building one mini-batch: local work, and for frontier nodes another
    machine owns, one RPC per hop to the owners and the sampled edges sent back. With DistDGL's
    server layout (`has_cores`) the owners' servers draw the remote edges (`serve_s`); the
    sampler receives, deserialises and merges their responses."""
    nodes, edges = counts.nodes, counts.edges
    far = remote_edges(nodes, edges, counts.frontier_remote) if machines > 1 else [0.0] * len(edges)
    served = has_cores(cluster)
    if (fits := measured_ops(cluster)) is not None and not served:
        work = measured_sample_s(fits, nodes, edges, counts.candidate_edges)
    else:
        work = SAMPLE_EDGE_S * (sum(edges) - (sum(far) if served else 0.0)) + SAMPLE_NODE_S * sum(nodes[1:])
    net = trainer_network_bytes_per_s(cluster, trainers_per_machine)
    for e in far:
        if e <= 0:
            continue
        if served:
            work += RPC_ROUND_TRIP_S + e * RESPONSE_EDGE_BYTES * (1 / net + 2 / CORE_COPY_BYTES_PER_S)
        else:
            work += exchange_round_s(cluster, machines) + e * SAMPLED_EDGE_BYTES / net
    return work


def serve_s(served: Demand, row_bytes: float, machines: int, cluster: ClusterSpec) -> float:
    """The machine's server process, per iteration: what the other machines' trainers ask of it
    (`served`, summed over them; simulate.py directs each trainer's remote requests to their
    owners). Sampling: two DRAM accesses per edge and its response serialised; pulls: gather
    and serialise each row; every request its handling."""
    if not has_cores(cluster) or machines <= 1:
        return 0.0
    work = (served.edges * (SERVER_EDGE_S + 2 * RESPONSE_EDGE_BYTES / CORE_COPY_BYTES_PER_S)
            + served.nodes * SAMPLE_NODE_S + served.rows * (row_bytes + ID_BYTES) * 2 / CORE_COPY_BYTES_PER_S
            + served.requests * SERVER_REQUEST_S)
    return work / SERVERS_PER_MACHINE


@dataclass(frozen=True)
class Demand:
    """Remote work per iteration: sampled edges and frontier nodes drawn by the owner, feature
    rows pulled from it, and the requests that carry them."""

    edges: float = 0.0
    nodes: float = 0.0
    rows: float = 0.0
    requests: float = 0.0

    def __add__(self, other: Demand) -> Demand:
        return Demand(self.edges + other.edges, self.nodes + other.nodes, self.rows + other.rows,
                      self.requests + other.requests)

    def __mul__(self, k: float) -> Demand:
        return Demand(self.edges * k, self.nodes * k, self.rows * k, self.requests * k)


def has_cores(cluster: ClusterSpec) -> bool:
    """The cluster says how many cores a machine has: DistDGL's process layout applies."""
    return cluster.host_cores_per_node is not None


def vcpus(cluster: ClusterSpec) -> int:
    return cluster.host_vcpus_per_node or cluster.host_cores_per_node


def trainer_threads(cluster: ClusterSpec, trainers_per_machine: int) -> int:
    """OMP threads of one trainer: DGL's launch.py default, vCPUs // 2 // trainers."""
    return max(1, vcpus(cluster) // 2 // trainers_per_machine)


def trainer_cores(cluster: ClusterSpec, trainers_per_machine: int) -> float:
    """Physical cores' worth of FMA throughput one trainer's threads get (hyperthreads share a core)."""
    return trainer_threads(cluster, trainers_per_machine) * cluster.host_cores_per_node / vcpus(cluster)


def oversubscription(cluster: ClusterSpec, plan: GNNPlan) -> float:
    """How much slower every CPU stage runs when the machine's processes want more cores than it
    has: trainers (their compute threads on a CPU machine, one feeding thread per trainer on a
    GPU machine), one core per sampler, the server(s). 1 when they fit or cores are unknown."""
    if not has_cores(cluster):
        return 1.0
    tpm = plan.trainers_per_machine
    trainers = 1.0 * tpm if cluster.host_offload else tpm * trainer_cores(cluster, tpm)
    demand = trainers + tpm * plan.samplers_per_trainer + SERVERS_PER_MACHINE
    return max(1.0, demand / cluster.host_cores_per_node)


def num_machines(cluster: ClusterSpec) -> int:
    """Machines, each holding one part of the graph. A CPU device (`host_offload: false`) is a
    machine of its own: the m5n-24xlarge device is the whole machine, and each rank of `Nxcpu`
    owns its partition as one of simtune's executor's trainers does. GPU machines hold one part
    for all their GPUs, as DistDGL partitions per machine."""
    return cluster.num_nodes if cluster.host_offload else cluster.num_devices


def devices_per_machine(cluster: ClusterSpec) -> int:
    return cluster.devices_per_node if cluster.host_offload else 1


def machine_network_bytes_per_s(cluster: ClusterSpec) -> float:
    """Achievable bandwidth of one machine's network interface (all its devices' shares)."""
    e = cluster.device.efficiency.inter_node.efficiency
    return cluster.bandwidth_bytes_per_s("inter_node") * devices_per_machine(cluster) * e


def trainer_network_bytes_per_s(cluster: ClusterSpec, trainers_per_machine: int) -> float:
    """What one trainer's remote reads get: its share of the interface, at most one RPC stream."""
    return min(RPC_STREAM_BYTES_PER_S, machine_network_bytes_per_s(cluster) / trainers_per_machine)


def local_gather_bytes_per_s(cluster: ClusterSpec) -> float:
    """Bandwidth of gathering feature rows from this machine's (host) memory."""
    d = cluster.device
    if cluster.host_offload:  # a GPU machine: features sit in host memory the spec does not describe
        return HOST_GATHER_BYTES_PER_S
    return d.hbm_bandwidth_bytes_per_s * d.efficiency.memory_bound


def fetch_local_s(nbytes: float, cluster: ClusterSpec, trainers_per_machine: int, rows: float = 0.0) -> float:
    """Copy of local (and cached) feature rows out of the machine's shared-memory store; the
    machine's trainers share its memory bandwidth. From the profile's measured `fetch` where
    it has one (`rows` rows of nbytes / rows bytes each)."""
    if (gather := measured_gather_s(cluster, nbytes, rows)) is not None:
        return gather
    return nbytes * trainers_per_machine / local_gather_bytes_per_s(cluster)


def lockstep_factor(cluster: ClusterSpec, stage: str) -> float:
    """How much longer a stage of `Nxcpu`'s lock-stepped ranks takes than one rank alone: the
    profile's lock-step ratio for the cluster's rank count (profiler/gnn.py; the largest
    measured count below it when it has none for that count), 1 for one rank, for clusters
    with DistDGL's servers and for profiles without lock-step rows."""
    fits, machines = measured_ops(cluster), num_machines(cluster)
    if fits is None or machines < 2 or has_cores(cluster) or cluster.num_nodes != 1:
        return 1.0
    measured = {int(n): f for n, f in (fits.get("lockstep") or {}).items() if isinstance(f, dict)}
    below = [n for n in measured if n <= machines]
    if not below:
        return 1.0
    return float(measured[max(below)].get(stage, 1.0))


def measured_gather_s(cluster: ClusterSpec, nbytes: float, rows: float) -> float | None:
    """A profiled gather of `rows` feature rows (`nbytes` in all) by simtune's executor, or None
    where the cluster's profile did not time one (then the bandwidth formulas price it)."""
    fits = measured_ops(cluster)
    if fits is None or not isinstance(fits.get("fetch"), dict) or rows <= 0 or has_cores(cluster):
        return None
    return op_s(fits, "fetch", rows=rows, width=nbytes / rows / FP32)


def fetch_remote_s(nbytes: float, remote_machines: float, cluster: ClusterSpec, trainers_per_machine: int,
                   rows: float = 0.0) -> float:
    """Pull of remote feature rows: parallel RPCs to the owning machines (one round trip), the
    rows through the machine's network interface shared by its trainers (at most one RPC
    stream's rate per trainer), and the owners' gathers (the same bytes out of their memory).
    With DistDGL's server layout the owners' servers gather (`serve_s`); the trainer sends the
    `rows` ids and deserialises and scatters the rows into the batch (two copies on one core)."""
    if nbytes <= 0:
        return 0.0
    link = trainer_network_bytes_per_s(cluster, trainers_per_machine)
    if has_cores(cluster):
        return (RPC_ROUND_TRIP_S * (remote_machines > 0) + (nbytes + rows * ID_BYTES) / link
                + 2 * nbytes / CORE_COPY_BYTES_PER_S)
    gather = measured_gather_s(cluster, nbytes, rows)
    gather = 2 * gather if gather is not None else nbytes * trainers_per_machine / local_gather_bytes_per_s(cluster)
    return exchange_round_s(cluster, remote_machines + 1) * (remote_machines > 0) + nbytes / link + gather


def h2d_s(cluster: ClusterSpec, nbytes: float) -> float:
    """Host-to-device copy of the batch (features and block structure) on GPU machines."""
    return nbytes / cluster.host_link_bytes_per_s() if cluster.host_offload else 0.0


def parameter_count(model: GNNModelSpec, feature_dim: int, num_classes: int) -> int:
    """Dense parameters (weights and biases) of the model, as DGL's layers hold them."""
    total = 0
    for d_in, d_out in layer_dims(model, feature_dim, num_classes):
        if model.architecture == "graphsage":
            total += 2 * d_in * d_out + d_out          # fc_self, fc_neigh (no bias), one bias
        elif model.architecture == "gcn":
            total += d_in * d_out + d_out
        else:
            total += d_in * d_out + 2 * d_out + d_out  # fc, attn_l, attn_r, bias
    return total


def allreduce_grad_s(cluster: ClusterSpec, plan: GNNPlan, model_bytes: float) -> float:
    """Dense gradient all-reduce over every trainer (DDP over gloo or NCCL): the machines' ring
    through their network interfaces; trainers of one machine reduce through its memory, and so
    do the one-core ranks of `Nxcpu` (its intra-node link: a profile's measured all-reduce)."""
    machines, per_machine = num_machines(cluster), plan.trainers_per_machine
    t = 0.0
    if per_machine > 1:
        t += allreduce_s(model_bytes, per_machine, Link.of(cluster, "intra_node"))
    if machines > 1 and cluster.num_nodes == 1:   # `Nxcpu`: the "machines" are ranks of one node
        t += float(allreduce_s(model_bytes, machines, Link.of(cluster, "intra_node")))
    elif machines > 1:
        link = Link.of(cluster, "inter_node", machines)
        link = Link(machine_network_bytes_per_s(cluster), link.alpha_s, link.alpha_inter_s, machines)
        t += float(allreduce_s(model_bytes, machines, link))
    return float(t)


def sparse_update_s(rows: float, remote_share: float, model: GNNModelSpec, cluster: ClusterSpec,
                    plan: GNNPlan) -> float:
    """Learnable node embeddings: the gradient rows of the batch's input nodes pushed to their
    owners (DistDGL's sparse optimizer), and the owners' update (read the row and its optimizer
    state, write both back)."""
    if not model.embedding_dim:
        return 0.0
    nbytes = rows * model.embedding_dim * FP32
    push = nbytes * remote_share / trainer_network_bytes_per_s(cluster, plan.trainers_per_machine)
    update = 4 * nbytes * plan.trainers_per_machine / local_gather_bytes_per_s(cluster)
    return push + update + (RPC_ROUND_TRIP_S if remote_share > 0 else 0.0)
