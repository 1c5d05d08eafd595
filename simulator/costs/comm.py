"""Collective and point-to-point communication times: NCCL's ring and tree, per group.

Bandwidth (NCCL-tests doc/PERFORMANCE.md, "bus bandwidth"): a ring all-reduce of S bytes
over n ranks moves 2(n-1)/n * S through every rank's link, an all-gather or a
reduce-scatter (n-1)/n * S. A group inside one node runs at the intra-node bandwidth per
device (NVLink). A group that spans nodes is bound by the NICs of its ranks (one NIC per GPU,
rail-optimized, the `inter_node_bandwidth_GBps` of the cluster): r ranks per node carry the
ring through r NICs at once (`group_link`). Achieved bandwidth = link peak x efficiency.

Latency follows NCCL's own cost model (NVIDIA/nccl `src/graph/tuning.cc`,
`ncclTopoTuneModel`):
- ring: a fixed cost per step, where only the steps that cross nodes pay the network
  latency: an all-gather or reduce-scatter takes n-1 steps of which N-1 cross nodes (N nodes
  spanned), an all-reduce twice as many. Ring latency therefore grows with n.
- tree (all-reduce only, NCCL's double binary tree across nodes, a chain inside each):
  2 * ((n/N - 1) intra-node hops + log2(N) network hops). Its bus bandwidth is 0.9 of the
  ring's and an all-reduce moves S up and S down (NCCL's algorithm bandwidth = bus x 0.5), so
  trees lose on bandwidth and win on latency: NCCL picks the faster of the two per call, and
  so does `allreduce_s`. All-gather and reduce-scatter have no tree in NCCL.
Small messages are latency-bound: a 30 MB per-layer gather over 1,000 ranks moves 30 KB per
step and pays 999 step latencies, which `allgather_s` shows without a separate efficiency curve.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Literal

import numpy as np

from simulator.specs.hardware import ClusterSpec

Level = Literal["intra_node", "inter_node"]
TREE_BANDWIDTH = 0.9  # NCCL tuning.cc: tree bus bandwidth = 0.9 x the ring's


@dataclass(frozen=True)
class Link:
    """What a communication group runs over: its bus bandwidth and step latencies.

    `alpha_s` is the latency of a step between ranks of one node, `alpha_inter_s` of a step
    that crosses nodes; `nodes` is how many nodes the group spans (1: no network steps).
    """

    bandwidth_bytes_per_s: float
    alpha_s: float
    alpha_inter_s: float = 0.0
    nodes: int = 1

    @classmethod
    def of(cls, cluster: ClusterSpec, level: Level, nodes: int | None = None) -> Link:
        """The link of `level`; an inter-node group spans `nodes` nodes (default 2)."""
        e = cluster.device.efficiency
        nodes = 1 if level == "intra_node" else max(2, nodes or 2)
        eff = getattr(e, level)
        return cls(cluster.bandwidth_bytes_per_s(level) * eff.efficiency, e.intra_node.alpha_us * 1e-6,
                   e.inter_node.alpha_us * 1e-6, nodes)


def group_level(cluster: ClusterSpec, group_size: int, stride: int) -> Level:
    """Link level of a group of `group_size` ranks spaced `stride` devices apart."""
    return "intra_node" if group_nodes(cluster, group_size, stride) == 1 else "inter_node"


def group_nodes(cluster: ClusterSpec, group_size: int, stride: int) -> int:
    """Nodes spanned by `group_size` ranks spaced `stride` devices apart (node-aligned)."""
    per_node = cluster.devices_per_node
    if stride >= per_node:
        return group_size
    return math.ceil(((group_size - 1) * stride + 1) / per_node)


def group_link(cluster: ClusterSpec, group_size: int, stride: int) -> Link:
    """The link of a group of `group_size` ranks spaced `stride` devices apart.

    A group spanning nodes with r ranks in each node runs one NCCL channel per NIC: every ring
    enters and leaves each node once, so a node's r NICs carry its share in parallel and the
    bus bandwidth is r x the per-GPU NIC rate (NCCL tuning.cc: bus bandwidth = channels x
    inter-node speed per channel), capped by the intra-node links the rest of the ring uses.
    With one rank per node (a DP group across TP-8 nodes) that is the per-GPU NIC. Measured:
    192 GB/s all-reduce bus bandwidth across DGX A100 nodes with 8 x 200 Gb/s NICs (NVIDIA's
    NCCL team, NVIDIA/nccl#812), 366 GB/s across 4 nodes of 8 x 400 Gb/s (nccl-tests#309)."""
    nodes = group_nodes(cluster, group_size, stride)
    if nodes == 1:
        return Link.of(cluster, "intra_node")
    link = Link.of(cluster, "inter_node", nodes)
    per_node = max(1, group_size // nodes)
    intra = Link.of(cluster, "intra_node").bandwidth_bytes_per_s
    return dataclasses.replace(link, bandwidth_bytes_per_s=min(per_node * link.bandwidth_bytes_per_s, intra))


def _ring_latency_s(steps: int, inter_steps: int, link: Link) -> float:
    return (steps - inter_steps) * link.alpha_s + inter_steps * link.alpha_inter_s


def ring_allreduce_s(nbytes, n: int, link: Link):
    """Ring all-reduce: 2(n-1)/n * S of bus traffic, 2(n-1) steps, 2(N-1) across nodes."""
    latency = _ring_latency_s(2 * (n - 1), 2 * (link.nodes - 1), link)
    return 2 * (n - 1) / n * nbytes / link.bandwidth_bytes_per_s + latency


def tree_allreduce_s(nbytes, n: int, link: Link):
    """NCCL's double binary tree: S up and S down at 0.9 of the ring's bus bandwidth, and
    2 * ((n/N - 1) intra-node + log2(N) network) hops of latency."""
    per_node = n / link.nodes
    latency = 2 * ((per_node - 1) * link.alpha_s + math.log2(link.nodes) * link.alpha_inter_s)
    return 2 * nbytes / (TREE_BANDWIDTH * link.bandwidth_bytes_per_s) + latency


def allreduce_s(nbytes, n: int, link: Link):
    """All-reduce time of `nbytes` per rank over n ranks (0 when n == 1): the faster of ring
    and tree, as NCCL chooses; trees are used only across nodes (NCCL's intra-node tree is a
    chain, never faster than the ring)."""
    if n <= 1:
        return np.zeros_like(np.asarray(nbytes, dtype=float))
    ring = ring_allreduce_s(nbytes, n, link)
    if link.nodes <= 1:
        return ring
    return np.minimum(ring, tree_allreduce_s(nbytes, n, link))


def allgather_s(nbytes, n: int, link: Link):
    """Ring all-gather (or reduce-scatter) time; `nbytes` is the full gathered size (each
    rank holds nbytes / n): (n-1)/n * S of bus traffic and n-1 steps, N-1 across nodes."""
    if n <= 1:
        return np.zeros_like(np.asarray(nbytes, dtype=float))
    latency = _ring_latency_s(n - 1, link.nodes - 1, link)
    return (n - 1) / n * nbytes / link.bandwidth_bytes_per_s + latency


reducescatter_s = allgather_s


def p2p_s(nbytes, link: Link):
    """One point-to-point transfer."""
    return nbytes / link.bandwidth_bytes_per_s + (link.alpha_inter_s if link.nodes > 1 else link.alpha_s)
