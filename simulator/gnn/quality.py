"""Partition quality as the epoch simulation needs it: cut, halo, per-part loads, cache hits.

From a real partition (`quality_of`) the figures are measured on the graph. For a graph too
large to build here (ogbn-papers100M: 3.2 billion edges), `estimated_quality` measures them on
a generated graph with the same statistics at a smaller scale and carries them over:

1. Build a graph of `SAMPLE_NODES` nodes with the spec's average degree, degree law, community
   count and within-community edge fraction (the generator of `simulator.gnn.graph`), and a
   training fraction of at least `SAMPLE_TRAIN_FRACTION` (see 3).
2. Partition it with the same method into the same number of parts (`partition_graph`).
3. Carry over the intensive figures, which do not depend on the node count for a fixed degree
   law and community structure: the fraction of edges cut (overall and per part), halo nodes
   per owned node, each part's share of every balance constraint, and the cache-hit curve.
   Training nodes are placed at random by the generator, so a part's share of them at full
   scale differs from its node share only by sampling noise (tens of thousands of training
   nodes per part); the training fraction is raised in the sample so that this noise does not
   dominate the measured imbalance at a few hundred training nodes per part. When the labelled
   nodes are concentrated (`train_community_fraction` f < 1) the raised fraction is at most
   half of the region they live in (`SAMPLE_TRAIN_FRACTION * 2f`), so they stay concentrated.

The cache-hit curve says which share of a part's remote feature reads its cache serves when it
keeps the `fraction` most-connected halo nodes: reads of a halo node are proportional to its
edges into the part (a sampled edge is a read), and the cache ranks halo nodes by degree, as
DistDGL's follow-ups cache hot nodes by degree (e.g. PaGraph, Lin et al. SoCC 2020).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np

from simulator.gnn.graph import Graph, generate_graph
from simulator.gnn.partition import Partition, partition_graph
from simulator.specs.graph import GraphSpec

SAMPLE_NODES = 40_000
SAMPLE_TRAIN_FRACTION = 0.2
CACHE_GRID = (0.0, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0)


@dataclass(frozen=True)
class PartitionQuality:
    """The figures of one partitioning that the epoch simulation reads.

    `train_share[p]`, `edge_share[p]`, `node_share[p]`: part p's share of the constraint (they
    sum to 1); `cut_fraction[p]`: share of part p's in-edges whose source another part owns;
    `halo_per_owned`: halo nodes over owned nodes, mean over parts; `cache_hit`: the hit share
    at each fraction of `CACHE_GRID`; `measured_on`: the graph the figures come from.
    """

    method: str
    num_parts: int
    edge_cut_fraction: float
    cut_fraction: list[float]
    halo_per_owned: float
    train_share: list[float]
    edge_share: list[float]
    node_share: list[float]
    balance: dict[str, float]
    cache_hit: list[float]
    measured_on: str

    def hit_rate(self, fraction: float) -> float:
        """Share of remote feature reads served by a cache of `fraction` of the halo."""
        return float(np.interp(fraction, CACHE_GRID, self.cache_hit))

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "num_parts": self.num_parts, "edge_cut_fraction": self.edge_cut_fraction,
                "halo_per_owned": self.halo_per_owned, "balance": self.balance, "measured_on": self.measured_on}


def quality_of(graph: Graph, partition: Partition) -> PartitionQuality:
    """The figures of `partition`, measured on `graph`."""
    parts, k = partition.parts, partition.num_parts
    dst = np.repeat(np.arange(graph.num_nodes), np.diff(graph.indptr))
    src = graph.indices.astype(np.int64)
    crossing = parts[src] != parts[dst]
    in_edges = np.bincount(parts[dst], minlength=k).astype(float)
    cut = np.bincount(parts[dst][crossing], minlength=k).astype(float)
    owned = np.bincount(parts, minlength=k).astype(float)
    loads = {c: np.asarray(partition.loads[c], dtype=float) for c in ("nodes", "edges", "train_nodes")}
    share = {c: (v / v.sum() if v.sum() else np.full(k, 1.0 / k)) for c, v in loads.items()}
    halo = np.array(partition.halo_sizes(), dtype=float)
    return PartitionQuality(
        method=partition.method, num_parts=k, edge_cut_fraction=float(partition.edge_cut_fraction),
        cut_fraction=list(cut / np.maximum(in_edges, 1)), halo_per_owned=float((halo / np.maximum(owned, 1)).mean()),
        train_share=list(share["train_nodes"]), edge_share=list(share["edges"]), node_share=list(share["nodes"]),
        balance=dict(partition.balance), cache_hit=_cache_curve(graph, parts, src[crossing], parts[dst][crossing], k),
        measured_on=graph.name)


def cached_nodes(graph: Graph, partition: Partition, part: int, fraction: float) -> np.ndarray:
    """Boolean mask of the nodes whose features `part` caches: the `fraction` of its halo with
    the highest degree."""
    mask = np.zeros(graph.num_nodes, dtype=bool)
    halo = partition.halo[part]
    keep = int(round(fraction * halo.size))
    if keep:
        degree = graph.in_degrees[halo]
        mask[halo[np.argsort(-degree, kind="stable")[:keep]]] = True
    return mask


def _cache_curve(graph: Graph, parts: np.ndarray, cut_src: np.ndarray, cut_part: np.ndarray, k: int) -> list[float]:
    """Hit share of remote reads at each CACHE_GRID fraction, pooled over parts."""
    if cut_src.size == 0:
        return [1.0] * len(CACHE_GRID)
    degree = graph.in_degrees
    hits = np.zeros(len(CACHE_GRID))
    for p in range(k):
        src = cut_src[cut_part == p]
        if not src.size:
            continue
        nodes, reads = np.unique(src, return_counts=True)
        order = np.argsort(-degree[nodes], kind="stable")
        cum = np.concatenate([[0], np.cumsum(reads[order])])
        for i, f in enumerate(CACHE_GRID):
            hits[i] += cum[int(round(f * nodes.size))]
    return list(hits / cut_src.size)


def sample_spec(spec: GraphSpec) -> GraphSpec:
    """The generated stand-in of `spec` at `SAMPLE_NODES` nodes (step 1 of the module note)."""
    n = min(int(spec.num_nodes), SAMPLE_NODES)
    degree = spec.average_degree
    return spec.model_copy(update={
        "name": f"{spec.name or 'graph'} at {n:,} nodes", "files": None, "num_nodes": n,
        "num_edges": int(min(degree, n - 1) * n) // 2 * 2, "feature_dim": 0,
        "num_communities": min(spec.num_communities, n),
        "train_fraction": max(spec.train_fraction, SAMPLE_TRAIN_FRACTION * min(1.0, 2 * spec.train_community_fraction)),
        "val_fraction": 0.0,
        "test_fraction": 0.0})


def estimated_quality(spec: GraphSpec, num_parts: int, method: str) -> PartitionQuality:
    """Partition quality of a statistical graph, measured on its smaller generated stand-in."""
    key = json.dumps(sample_spec(spec).model_dump(mode="json"), sort_keys=True)
    return _estimated(key, num_parts, method)


@lru_cache(maxsize=64)
def _sample_graph(key: str) -> Graph:
    return generate_graph(GraphSpec.parse(json.loads(key)))


@lru_cache(maxsize=128)
def _estimated(key: str, num_parts: int, method: str) -> PartitionQuality:
    graph = _sample_graph(key)
    return quality_of(graph, partition_graph(graph, min(num_parts, graph.num_nodes), method))
