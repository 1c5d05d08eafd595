"""Neighbor sampling: how many unique nodes and edges each layer of a mini-batch touches.

A mini-batch of B seed nodes with fan-outs f_1..f_L (seed side first) expands hop by hop: every
node of hop h draws min(f_h, degree) of its in-neighbors, and hop h+1 is the union of hop h and
those neighbors (DGL's blocks keep the destination nodes among the sources). Two ways to count:

- **measured** (`sample_counts`): run a vectorised neighbor sampler on the real graph for a few
  mini-batches of a part's training nodes, and count unique nodes per hop, sampled edges, and
  which input nodes the part owns, which are cached halo nodes and which are remote.
- **statistical** (`expected_counts`): from the degree statistics alone. A node is reached by a
  sampled edge with probability proportional to its degree (an edge's end is degree-biased), so
  after D draws node v has been drawn with probability 1 - exp(-D d_v / sum d): the expected
  number of unique nodes when drawing with replacement from a finite population, with unequal
  weights. Coverage of hop h+1 = 1 - (1 - coverage of hop h) * exp(-D_h d_v / sum d), summed
  over a fixed sample of the degree distribution and scaled to the graph's node count. It
  saturates at the node count and grows monotonically with the batch (Balin et al.,
  "Cooperative Minibatching", arXiv 2310.12403, measure the same saturation on real graphs).

Draws per node at hop h are E[min(f_h, D)], with D the degree of a node reached through an edge
(size-biased) for h >= 1 and of a uniform training node for the seeds.

Candidate edges: a sampler that draws without replacement by shuffling a row's neighbor list
(simtune's executor, `executor.gnn.sampler`) handles every edge of a row with more than f_h
neighbors, not only the f_h it keeps. The frontier of a hop h >= 1 is degree-biased (its new
nodes are edge ends), so on a power-law graph these candidates outnumber the sampled edges
several times (community-20k, 1,000 seeds, fan-outs 15, 10, 5: 230,000 candidates for 47,000
sampled edges at the second hop). Statistical path: the sum of D 1(D > f_h) over the degree
sample, each node weighted by its coverage of hop h (its chance to be in that frontier). The degree sample
follows the generator's law (simulator.gnn.graph: Pareto with exponent gamma - 1, capped at
sqrt(edges), scaled to the mean degree), so the statistical path and generated graphs agree.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

from simulator.gnn.graph import Graph, sorted_unique
from simulator.specs.graph import GraphSpec

DEGREE_SAMPLE = 200_000
"""Degree draws standing for the whole population in the statistical path."""


@dataclass(frozen=True)
class HopCounts:
    """What one mini-batch of one trainer touches, per hop from the seeds outwards.

    `nodes[h]`: unique nodes of hop h (`nodes[0]` = the seeds, `nodes[-1]` = the input nodes
    whose features are fetched); `edges[h]`: edges sampled from hop h's nodes (h < L).
    `input_local`, `input_cached`, `input_remote`: the input nodes split by where their features
    live (owned by the trainer's machine, in its cache, on another machine); `frontier_remote`:
    nodes of hops 0..L-1 owned by another machine (their neighbors are sampled by a remote
    server, DistDGL's distributed sampling).
    """

    nodes: list[float]
    edges: list[float]
    input_local: float
    input_cached: float
    input_remote: float
    frontier_remote: list[float] = field(default_factory=list)
    candidates: list[float] = field(default_factory=list)
    """Per hop, the in-edges of frontier rows with more neighbors than the fan-out (what a
    shuffling sampler draws from); empty when unknown (then the sampled edges stand in)."""

    @property
    def candidate_edges(self) -> list[float]:
        return self.candidates or self.edges

    @property
    def input_nodes(self) -> float:
        return self.nodes[-1]

    @property
    def sampled_edges(self) -> float:
        return float(sum(self.edges))


# --- statistical path -------------------------------------------------------------------------


@lru_cache(maxsize=64)
def degree_sample(num_nodes: int, num_edges: int, exponent: float, distribution: str) -> np.ndarray:
    """A fixed sample of in-degrees with the generator's law and the graph's mean degree."""
    rng = np.random.default_rng(12345)
    mean = num_edges / max(num_nodes, 1)
    if distribution == "poisson":
        return rng.poisson(mean, DEGREE_SAMPLE).astype(float)
    w = (1.0 - rng.random(DEGREE_SAMPLE)) ** (-1.0 / (exponent - 1.0))
    w = np.minimum(w, max(1.0, np.sqrt(num_edges)))
    return w * (mean / w.mean())


def spec_degrees(spec: GraphSpec) -> np.ndarray:
    return degree_sample(int(spec.num_nodes), int(spec.num_edges), float(spec.degree_exponent),
                         spec.degree_distribution)


def expected_counts(spec: GraphSpec, fanouts: list[int], batch_size: int
                    ) -> tuple[list[float], list[float], list[float]]:
    """(nodes per hop, edges per hop, candidate edges per hop) of one mini-batch of `batch_size`
    seeds, expected values."""
    d = spec_degrees(spec)
    n = float(spec.num_nodes)
    batch = float(min(batch_size, spec.num_train_nodes))
    share = d / (n * d.mean())                           # chance one sampled edge ends at v
    size_biased = d / d.mean() / d.size                  # weight of v among edge ends
    coverage = np.full(d.size, batch / n)                # seeds: uniform training nodes
    nodes, edges, candidates = [batch], [], []
    for h, f in enumerate(fanouts):
        per_node = np.minimum(f, d)
        draws_per_node = per_node.mean() if h == 0 else float((per_node * size_biased).sum())
        draws = nodes[-1] * draws_per_node
        edges.append(draws)
        candidates.append(float(n * (coverage * np.where(d > f, d, 0.0)).mean()))   # frontier rows over f
        coverage = 1.0 - (1.0 - coverage) * np.exp(-draws * share)
        nodes.append(float(min(n, coverage.mean() * n)))
    return nodes, edges, candidates


# --- measured path ----------------------------------------------------------------------------


def sample_neighbors(indptr: np.ndarray, indices: np.ndarray, rows: np.ndarray, fanout: int,
                     rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Up to `fanout` distinct in-neighbors of each row (positions into the CSR `indptr`), drawn
    without replacement; all of them when the row has no more than `fanout`. Returns (counts per
    row, the neighbors concatenated in row order).

    Vectorized over the rows (simtune's GNN executor samples with this function): every
    candidate edge gets the key `row + U(0, 1)`; one argsort orders each row's edges randomly
    and keeps rows together, and the first `fanout` of each row are the sample. Rows of degree
    <= fanout skip the draw, so the sort covers only the edges of rows that must drop some."""
    rows = np.asarray(rows, dtype=np.int64)
    starts, degrees = indptr[rows], indptr[rows + 1] - indptr[rows]
    counts = np.minimum(degrees, fanout)
    out_start = np.cumsum(counts) - counts
    out = np.empty(int(counts.sum()), dtype=indices.dtype)
    small = np.flatnonzero(degrees <= fanout)  # these keep every edge
    out[_ranges(out_start[small], degrees[small])] = indices[_ranges(starts[small], degrees[small])]
    big = np.flatnonzero(degrees > fanout)     # these keep a random `fanout` of theirs
    if big.size:
        degree = degrees[big]
        row_of = np.repeat(np.arange(big.size), degree)
        first = np.cumsum(degree) - degree
        order = np.argsort(row_of + rng.random(row_of.size))  # rows stay in order, edges shuffled
        keep = order[np.arange(order.size) - first[row_of] < fanout]
        csr = starts[big][row_of[keep]] + keep - first[row_of[keep]]
        out[_ranges(out_start[big], counts[big])] = indices[csr]
    return counts, out


def _ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """The concatenation of arange(s, s + n) over (starts, lengths)."""
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    first = np.cumsum(lengths) - lengths
    return np.repeat(starts - first, lengths) + np.arange(total)


def sample_batch(graph: Graph, seeds: np.ndarray, fanouts: list[int], rng: np.random.Generator
                 ) -> tuple[list[np.ndarray], list[int], list[int]]:
    """Sample one mini-batch: the unique node ids per hop (seeds first), the sampled edges and
    the candidate edges (of rows with more than f neighbors) per hop. Each hop draws as the
    executor's sampler does (`sample_neighbors`: without replacement, as DGL's)."""
    indptr, indices = graph.indptr, graph.indices
    frontier = sorted_unique(np.asarray(seeds, dtype=np.int64))
    hops, edges, candidates = [frontier], [], []
    for f in fanouts:
        deg = indptr[frontier + 1] - indptr[frontier]
        candidates.append(int(deg[deg > f].sum()))
        _, nbrs = sample_neighbors(indptr, indices, frontier, f, rng)
        edges.append(int(nbrs.size))
        frontier = sorted_unique(np.concatenate([frontier, nbrs.astype(np.int64)]))
        hops.append(frontier)
    return hops, edges, candidates


def sample_counts(graph: Graph, parts: np.ndarray, part: int, num_parts: int, fanouts: list[int],
                  batch_size: int, cached: np.ndarray | None = None, batches: int = 4, seed: int = 0
                  ) -> tuple[HopCounts, float]:
    """Mean counts over `batches` mini-batches of `part`'s seeds on the real graph, and the
    fraction of those seeds the part owns.

    `parts` maps node -> owning part; `cached` is a boolean mask of nodes whose features this
    part caches. Seeds are split as DGL's `node_split(force_even=True)` does: every part gets
    an equal quota of training nodes, its own first, the rest from parts that have too many."""
    rng = np.random.default_rng(seed + 7919 * part)
    train = graph.train_nodes
    quota = -(-train.size // num_parts)
    own = train[parts[train] == part]
    pool = own
    if own.size < quota:
        others = train[parts[train] != part]
        pool = np.concatenate([own, rng.choice(others, size=min(others.size, quota - own.size), replace=False)])
    acc = {"nodes": np.zeros(len(fanouts) + 1), "edges": np.zeros(len(fanouts)), "candidates": np.zeros(len(fanouts)),
           "local": 0.0, "cached": 0.0, "remote": 0.0, "frontier_remote": np.zeros(len(fanouts))}
    for _ in range(batches):
        seeds = rng.choice(pool, size=min(batch_size, pool.size), replace=False)
        hops, edges, candidates = sample_batch(graph, seeds, fanouts, rng)
        acc["nodes"] += [h.size for h in hops]
        acc["edges"] += edges
        acc["candidates"] += candidates
        inputs = hops[-1]
        local = parts[inputs] == part
        hit = ~local & (cached[inputs] if cached is not None else False)
        acc["local"] += local.sum()
        acc["cached"] += hit.sum()
        acc["remote"] += (~local & ~hit).sum()
        acc["frontier_remote"] += [(parts[h] != part).sum() for h in hops[:-1]]
    k = float(batches)
    counts = HopCounts([float(x) for x in acc["nodes"] / k], [float(x) for x in acc["edges"] / k],
                       float(acc["local"] / k), float(acc["cached"] / k), float(acc["remote"] / k),
                       [float(x) for x in acc["frontier_remote"] / k], [float(x) for x in acc["candidates"] / k])
    return counts, float(min(own.size, quota) / max(pool.size, 1))


def split_counts(nodes: list[float], edges: list[float], seed_local: float, cut: float, mean_cut: float,
                 num_parts: int, cache_hit: float, candidates: list[float] | None = None) -> HopCounts:
    """Where a part's sampled nodes live, from its cut fraction (statistical path).

    A sampled edge of a node the part owns leaves the part with probability `cut` (the part's
    share of cut in-edges); one of a node another part owns comes back with probability
    `mean_cut / (num_parts - 1)`. Hop h+1's new nodes inherit hop h's mix through that chain,
    starting from the seeds' local share; `cache_hit` of the remote input reads hit the cache."""
    if num_parts <= 1:
        return HopCounts(nodes, edges, nodes[-1], 0.0, 0.0, [0.0] * len(edges), list(candidates or []))
    back = mean_cut / (num_parts - 1)
    local = [seed_local * nodes[0]]
    for h in range(len(edges)):
        share = local[-1] / max(nodes[h], 1.0)
        new = max(0.0, nodes[h + 1] - nodes[h])
        local.append(local[-1] + new * (share * (1 - cut) + (1 - share) * back))
    remote = nodes[-1] - local[-1]
    return HopCounts(nodes, edges, local[-1], remote * cache_hit, remote * (1 - cache_hit),
                     [n - l for n, l in zip(nodes[:-1], local[:-1])], list(candidates or []))
