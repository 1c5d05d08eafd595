"""Collective and point-to-point communication times: alpha-beta per link level.

Formulas follow NCCL-tests' bus-bandwidth accounting (doc/PERFORMANCE.md): a ring
all-reduce of S bytes over n ranks moves 2(n-1)/n * S per rank, an all-gather or a
reduce-scatter (n-1)/n * S; each ring step costs a fixed latency alpha. A group that spans
nodes runs at the inter-node bandwidth per device (one NIC per GPU, rail-optimized), a group
inside a node at the intra-node bandwidth. Achieved bandwidth = link peak x efficiency.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from simulator.specs.hardware import ClusterSpec

Level = Literal["intra_node", "inter_node"]


@dataclass(frozen=True)
class Link:
    """Achievable bandwidth and per-step latency of one link level."""

    bandwidth_bytes_per_s: float
    alpha_s: float

    @classmethod
    def of(cls, cluster: ClusterSpec, level: Level) -> Link:
        eff = getattr(cluster.device.efficiency, level)
        return cls(cluster.bandwidth_bytes_per_s(level) * eff.efficiency, eff.alpha_us * 1e-6)


def group_level(cluster: ClusterSpec, group_size: int, stride: int) -> Level:
    """Link level of a group of `group_size` ranks spaced `stride` devices apart."""
    span = (group_size - 1) * stride + 1
    return "intra_node" if span <= cluster.devices_per_node else "inter_node"


def allreduce_s(nbytes, n: int, link: Link):
    """Ring all-reduce time of `nbytes` per rank over n ranks (0 when n == 1)."""
    if n <= 1:
        return np.zeros_like(np.asarray(nbytes, dtype=float))
    return 2 * (n - 1) / n * nbytes / link.bandwidth_bytes_per_s + 2 * (n - 1) * link.alpha_s


def allgather_s(nbytes, n: int, link: Link):
    """Ring all-gather (or reduce-scatter) time; `nbytes` is the full gathered size."""
    if n <= 1:
        return np.zeros_like(np.asarray(nbytes, dtype=float))
    return (n - 1) / n * nbytes / link.bandwidth_bytes_per_s + (n - 1) * link.alpha_s


reducescatter_s = allgather_s


def p2p_s(nbytes, link: Link):
    """One point-to-point transfer."""
    return nbytes / link.bandwidth_bytes_per_s + link.alpha_s
