"""Partitioning a graph across machines: METIS (min edge cut), random, and balanced METIS.

DistDGL (Zheng et al., arXiv 2010.05337) partitions with METIS and, to keep every trainer
equally busy, balances several constraints at once: training nodes, edges and nodes per part
(METIS's multi-constraint mode). pymetis fixes the number of constraints at one, so
`metis-balanced` does it in two steps:

1. METIS on one combined vertex weight, `nodes/N + in_edges/E + train/T` per node (scaled to
   integers): each constraint gets an equal share of the single weight METIS balances;
2. a greedy rebalancing pass: while some part holds more than `1 + BALANCE_TOLERANCE` times the
   mean of some constraint, move that part's nodes, those with the most neighbors in the
   receiving part first (the least added cut), wherever a move lowers the total overload
   (`rebalance`).

It stops when every constraint's balance (largest part / mean part) is at most
`1 + BALANCE_TOLERANCE`, or when no single move lowers the overload (a greedy pass can stall; the
balance reported is what was reached, and the tests and benchmark check it). Plain `metis` balances node counts only (METIS's default 3%
imbalance), which on graphs with skewed degrees or training sets leaves edges and training
nodes imbalanced: DistDGL's ogbn-papers100M case where plain METIS loses to random.

Halo nodes of a part are the remote in-neighbors of its owned nodes: exactly the nodes whose
features a 1-hop sample of an owned node may need from another machine (DGL's `halo_hops=1`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from simulator.errors import SpecError
from simulator.gnn.graph import Graph, sorted_unique

METHODS = ("metis", "random", "metis-balanced")
BALANCE_TOLERANCE = 0.05
"""metis-balanced aims for every constraint's largest part at most 1.05 x the mean part."""
CONSTRAINTS = ("nodes", "edges", "train_nodes")


@dataclass(frozen=True, eq=False)
class Partition:
    """Which part owns each node, and what that costs: halo nodes, edge cut, balance."""

    method: str
    num_parts: int
    parts: np.ndarray
    halo: list[np.ndarray]
    edge_cut: int
    edge_cut_fraction: float
    loads: dict[str, list[int]]
    balance: dict[str, float]
    seconds: float

    def owned(self, part: int) -> np.ndarray:
        """Sorted global ids of the nodes `part` owns."""
        return np.flatnonzero(self.parts == part).astype(np.int64)

    def halo_sizes(self) -> list[int]:
        return [int(h.size) for h in self.halo]

    def to_dict(self) -> dict[str, Any]:
        """The summary `simtune partition --json` prints (no per-node arrays)."""
        return {
            "method": self.method, "num_parts": self.num_parts, "edge_cut": self.edge_cut,
            "edge_cut_fraction": self.edge_cut_fraction, "balance": self.balance,
            "balance_tolerance": BALANCE_TOLERANCE if self.method == "metis-balanced" else None,
            "halo_nodes": self.halo_sizes(), "owned_nodes": self.loads["nodes"],
            "loads": self.loads, "seconds": self.seconds,
        }


def partition_graph(graph: Graph, num_parts: int, method: str = "metis", seed: int = 0) -> Partition:
    """Split `graph` into `num_parts` parts with `method` (one of METHODS); seeded."""
    if isinstance(num_parts, bool) or not isinstance(num_parts, (int, np.integer)) or num_parts < 1:
        raise SpecError("parts", num_parts, "must be an integer >= 1")
    if num_parts > graph.num_nodes:
        raise SpecError("parts", num_parts, f"must be <= the graph's {graph.num_nodes} nodes")
    if method not in METHODS:
        raise SpecError("method", method, f"must be one of {', '.join(METHODS)}")
    t0 = time.perf_counter()
    if num_parts == 1:
        parts = np.zeros(graph.num_nodes, dtype=np.int32)
    elif method == "random":
        # a stream of its own: the generator's first draw from the same seed assigns communities
        # by permutation too, and must not reappear as the partition
        rng = np.random.default_rng([seed, 0x5EED])
        parts = (rng.permutation(graph.num_nodes) % num_parts).astype(np.int32)
    else:
        weights = _combined_weights(graph) if method == "metis-balanced" else None
        parts = _metis(graph, num_parts, weights, seed)
        if method == "metis-balanced":
            parts = rebalance(graph, parts, num_parts)
    seconds = time.perf_counter() - t0
    return _describe(graph, parts, num_parts, method, seconds)


def _describe(graph: Graph, parts: np.ndarray, num_parts: int, method: str, seconds: float) -> Partition:
    cut = edge_cut(graph, parts)
    loads = _loads(graph, parts, num_parts)
    return Partition(method=method, num_parts=num_parts, parts=parts, halo=halo_nodes(graph, parts, num_parts),
                     edge_cut=cut, edge_cut_fraction=cut / max(graph.num_edges, 1),
                     loads={k: [int(x) for x in v] for k, v in zip(CONSTRAINTS, loads.T)},
                     balance={k: _balance(v) for k, v in zip(CONSTRAINTS, loads.T)}, seconds=seconds)


def edge_cut(graph: Graph, parts: np.ndarray) -> int:
    """Stored edges whose two ends lie in different parts (an undirected edge counts twice)."""
    return int(np.count_nonzero(parts[graph.indices] != parts[graph.destinations()]))


def halo_nodes(graph: Graph, parts: np.ndarray, num_parts: int) -> list[np.ndarray]:
    """Per part, the sorted global ids of remote in-neighbors of the nodes it owns."""
    dst_part = parts[graph.destinations()].astype(np.int64)
    src_part = parts[graph.indices]
    cut = dst_part != src_part
    keys = sorted_unique(dst_part[cut] * graph.num_nodes + graph.indices[cut])
    bounds = np.searchsorted(keys, np.arange(num_parts + 1, dtype=np.int64) * graph.num_nodes)
    return [keys[bounds[p]:bounds[p + 1]] - p * graph.num_nodes for p in range(num_parts)]


def _node_loads(graph: Graph) -> np.ndarray:
    """(nodes, 3): what each node adds to each constraint: itself, its in-edges, training or not."""
    train = np.zeros(graph.num_nodes) if graph.train_mask is None else graph.train_mask.astype(float)
    return np.stack([np.ones(graph.num_nodes), graph.in_degrees.astype(float), train], axis=1)


def _loads(graph: Graph, parts: np.ndarray, num_parts: int) -> np.ndarray:
    node = _node_loads(graph)
    return np.stack([np.bincount(parts, weights=node[:, k], minlength=num_parts) for k in range(3)], axis=1)


def _balance(loads: np.ndarray) -> float:
    """Largest part over the mean part (1.0 = perfect; nan when the constraint is empty)."""
    mean = loads.mean()
    return float(loads.max() / mean) if mean > 0 else float("nan")


def _combined_weights(graph: Graph) -> np.ndarray:
    """One integer vertex weight giving nodes, edges and training nodes an equal share."""
    node = _node_loads(graph)
    totals = np.maximum(node.sum(axis=0), 1.0)
    share = (node / totals).sum(axis=1)
    return np.maximum(1, np.rint(share / share.min() if share.min() > 0 else share)).astype(np.int64)


def _metis(graph: Graph, num_parts: int, vweights: np.ndarray | None, seed: int) -> np.ndarray:
    import pymetis

    xadj, adjncy = _metis_adjacency(graph)
    options = pymetis.Options(seed=seed)
    adjacency = pymetis.CSRAdjacency(adj_starts=xadj, adjacent=adjncy)
    _, membership = pymetis.part_graph(num_parts, adjacency, vweights=vweights, options=options)
    return np.asarray(membership, dtype=np.int32)


def _metis_adjacency(graph: Graph) -> tuple[np.ndarray, np.ndarray]:
    """The symmetric adjacency METIS needs (each edge both ways, no self loops or duplicates)."""
    if graph.symmetric:
        return graph.indptr, graph.indices.astype(np.int64)
    src, dst = graph.indices.astype(np.int64), graph.destinations().astype(np.int64)
    lo, hi = np.minimum(src, dst), np.maximum(src, dst)
    keep = lo != hi
    keys = sorted_unique(lo[keep] * graph.num_nodes + hi[keep])
    a, b = keys // graph.num_nodes, keys % graph.num_nodes
    s, d = np.concatenate([a, b]), np.concatenate([b, a])
    order = np.argsort(d, kind="stable")
    xadj = np.zeros(graph.num_nodes + 1, dtype=np.int64)
    np.cumsum(np.bincount(d, minlength=graph.num_nodes), out=xadj[1:])
    return xadj, s[order]


# --- the rebalancing pass ----------------------------------------------------------------------


def rebalance(graph: Graph, parts: np.ndarray, num_parts: int, tolerance: float = BALANCE_TOLERANCE,
              max_rounds: int = 200) -> np.ndarray:
    """Greedy single-node moves until every constraint's balance is <= 1 + tolerance.

    Loads are measured in units of the mean part, and the overload of a part is how far each
    constraint lies above `1 + tolerance / 2` (aiming inside the bound), summed. A round visits
    each overloaded part and moves its nodes, most neighbors in the receiving part first (the
    least added cut), to whichever part the move lowers the total overload most for; a move
    that does not lower it is not made, so the pass ends. Moving a part's spare nodes out of a
    node-heavy part and its training nodes out of a training-heavy part are separate moves that
    each lower the overload, which is how several constraints get balanced with one weight.
    """
    parts = parts.copy()
    node = _node_loads(graph)
    mean = node.sum(axis=0) / num_parts
    unit = np.divide(node, mean, out=np.zeros_like(node), where=mean > 0)  # loads in mean parts
    loads = _loads(graph, parts, num_parts) / np.where(mean > 0, mean, 1.0)
    dst = graph.destinations()
    aim = 1.0 + tolerance / 2
    for _ in range(max_rounds):
        if loads.max() <= 1.0 + tolerance + 1e-12:
            break
        moved = 0
        for p in np.flatnonzero((loads > aim).any(axis=1)):
            moved += _move_from(graph, parts, dst, unit, loads, int(p), aim)
        if moved == 0:
            break
    return parts


def _overload(loads: np.ndarray, aim: float) -> np.ndarray:
    return np.clip(loads - aim, 0.0, None).sum(axis=-1)


def _move_from(graph: Graph, parts: np.ndarray, dst: np.ndarray, unit: np.ndarray, loads: np.ndarray,
               p: int, aim: float) -> int:
    """Move nodes out of part p while each move lowers the total overload; updates parts, loads."""
    num_parts = loads.shape[0]
    owned = np.flatnonzero(parts == p)
    if owned.size == 0:
        return 0
    local = np.full(graph.num_nodes, -1, dtype=np.int64)
    local[owned] = np.arange(owned.size)
    e = local[dst] >= 0  # in-edges of owned nodes: neighbor counts per (owned node, part)
    counts = np.bincount(local[dst[e]] * num_parts + parts[graph.indices[e]],
                         minlength=owned.size * num_parts).reshape(owned.size, num_parts).astype(float)
    a = unit[owned]
    # overload change of moving each node to each part, at the current loads
    delta = (_overload(loads[None, :, :] + a[:, None, :], aim) - _overload(loads, aim)[None, :]
             + (_overload(loads[p] - a, aim) - _overload(loads[p], aim))[:, None])
    delta[:, p] = np.inf
    gain = counts - counts[:, [p]]
    score = np.where(delta < -1e-12, gain, -np.inf)
    q = score.argmax(axis=1)
    useful = np.isfinite(score[np.arange(owned.size), q])
    order = np.flatnonzero(useful)[np.argsort(-score[useful, q[useful]], kind="stable")]
    moved = 0
    for i in order:
        if _overload(loads[p], aim) <= 0:
            break
        qi = q[i]
        before = _overload(loads[p], aim) + _overload(loads[qi], aim)
        after = _overload(loads[p] - a[i], aim) + _overload(loads[qi] + a[i], aim)
        if after >= before - 1e-12:
            continue
        loads[p] -= a[i]
        loads[qi] += a[i]
        parts[owned[i]] = qi
        moved += 1
    return moved
