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
"""

from __future__ import annotations

from dataclasses import dataclass

from simulator.costs.comm import Link, allreduce_s
from simulator.costs.timing import gemm_efficiency
from simulator.specs.gnn import GNNModelSpec, GNNPlan
from simulator.specs.hardware import ClusterSpec

SAMPLE_EDGE_S = 100e-9
SAMPLE_NODE_S = 200e-9
RPC_ROUND_TRIP_S = 1e-3
RPC_STREAM_BYTES_PER_S = 1.25e9
HOST_GATHER_BYTES_PER_S = 20e9
KERNELS_PER_LAYER = 30
SAMPLED_EDGE_BYTES = 16       # (src, dst) int64 ids of one sampled edge sent back by a server
FP32 = 4


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
    """Forward and backward of one mini-batch on a trainer's share of its device (fp32)."""
    d = cluster.device
    peak = 1e12 * d.peak_tflops.get("fp32", d.peak_tflops.get("bf16", 0.0)) / trainers_per_device
    bandwidth = d.hbm_bandwidth_bytes_per_s * d.efficiency.memory_bound / trainers_per_device
    total = 0.0
    for layer in layers:
        total += layer.gemm_flops / (peak * gemm_efficiency(d, layer.min_dim))
        total += layer.gather_bytes / bandwidth
        total += KERNELS_PER_LAYER * d.efficiency.kernel_overhead_us * 1e-6
    return total


def sampling_s(nodes: list[float], edges: list[float], remote_frontier: list[float],
               machines: int, cluster: ClusterSpec, trainers_per_machine: int) -> float:
    """One sampler process building one mini-batch: local work, and for frontier nodes another
    machine owns, one RPC per hop to the owners and the sampled edges sent back."""
    work = SAMPLE_EDGE_S * sum(edges) + SAMPLE_NODE_S * sum(nodes[1:])
    if machines <= 1:
        return work
    rpc = 0.0
    for h, remote in enumerate(remote_frontier):
        if remote <= 0:
            continue
        share = remote / max(nodes[h], 1.0)
        nbytes = share * edges[h] * SAMPLED_EDGE_BYTES
        rpc += RPC_ROUND_TRIP_S + nbytes / trainer_network_bytes_per_s(cluster, trainers_per_machine)
    return work + rpc


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


def fetch_local_s(nbytes: float, cluster: ClusterSpec, trainers_per_machine: int) -> float:
    """Copy of local (and cached) feature rows out of the machine's shared-memory store; the
    machine's trainers share its memory bandwidth."""
    return nbytes * trainers_per_machine / local_gather_bytes_per_s(cluster)


def fetch_remote_s(nbytes: float, remote_machines: float, cluster: ClusterSpec, trainers_per_machine: int) -> float:
    """Pull of remote feature rows: parallel RPCs to the owning machines (one round trip), the
    rows through the machine's network interface shared by its trainers (at most one RPC
    stream's rate per trainer), and the owners' gathers (the same bytes out of their memory)."""
    if nbytes <= 0:
        return 0.0
    net = nbytes / trainer_network_bytes_per_s(cluster, trainers_per_machine)
    gather = nbytes * trainers_per_machine / local_gather_bytes_per_s(cluster)
    return RPC_ROUND_TRIP_S * (remote_machines > 0) + net + gather


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
    through their network interfaces; trainers of one machine reduce through its memory."""
    machines, per_machine = num_machines(cluster), plan.trainers_per_machine
    t = 0.0
    if per_machine > 1:
        t += allreduce_s(model_bytes, per_machine, Link.of(cluster, "intra_node"))
    if machines > 1:
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
