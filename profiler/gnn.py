"""GNN training on one CPU core: the operations simtune's GNN executor (`executor/gnn/`) runs.

A mini-batch of the executor costs far more than its FLOPs at GEMM rate and its bytes at
memory bandwidth: the sparse aggregation builds and coalesces a sparse matrix per layer, the
sampler sorts and relabels ids in numpy, dropout draws a random number per element, and
Python and the optimizer cost a fixed amount per batch. This family times each of those
through the executor's own functions, at shapes around what its batches produce, so the
simulator prices a batch from measured per-operation costs (`simulator/gnn/costs.py`).

Operations (the table's `op`; shapes in the key columns rows, fanout, width, d_out)
------------------------------------------------------------------------------------
- `sample`: one hop of `DistSampler._one_hop` on one rank (`rows` frontier nodes, up to
  `fanout` neighbors each, drawn without replacement, put back into frontier order), on the
  catalog's generated `community-20k` graph. Rows with more neighbors than `fanout` shuffle
  all of theirs (one random key per candidate edge, one argsort), so the cost follows the
  candidate edges as well as the sampled ones. Each shape is timed on two frontiers (the
  `frontier` column): `uniform` nodes, as the seeds are, and `edge-end` nodes (ends of random
  edges, degree-biased), as every later hop's new nodes are; on a power-law graph the second
  has several times the candidates per row, which separates the two terms.
- `to_block`: relabelling that hop's nodes into a block (`executor.gnn.sampler.to_block`:
  np.unique over frontier + neighbors, order of first appearance), on the same two frontiers.
- `aggregate` / `aggregate_input`: `mean_of_neighbors` forward and backward on a block of
  `rows` dst nodes, `fanout` sampled edges each, `src` = rows + edges / 4 source nodes and
  `width` features: the sparse mean matrix (built and coalesced) times the features; `_input`
  is the input layer, whose features need no gradient.
- `linear` / `linear_input`: one `nn.Linear(width, d_out)` on `rows` rows, forward and
  backward (the weight's gradient; the input's too unless `_input`).
- `relu_dropout`: the executor's ReLU and inverted dropout (p = 0.5) between layers, forward
  and backward, over rows x width elements.
- `gat_attention`: `gat_attention` (executor/gnn/model.py) forward and backward on a block of
  `rows` dst nodes with `fanout` sampled edges each and a self loop per dst node, over
  projected source rows of `width` = heads x `d_out` (per head) features: the per-edge scores,
  the softmax over each dst node's edges and the weighted sum. GAT's projection is a `linear`.
- `fetch`: `FeatureStore.fetch` (executor/gnn/features.py) of `rows` random rows of a
  20,000-row fp32 feature table of `width` columns, all held locally: the slot lookup, the
  row gather into the batch and its fp32 copy (a remote row costs this on its owner and again
  when scattered into the requester's batch; the simulator adds the exchange).
- `optimizer`: a batch's fixed cost: zero_grad, the loss on 1,000 seeds and Adam's step over a
  3-layer GraphSAGE of hidden `width` (input 32, 8 classes), forward and backward of its layers
  excluded (`params` its parameter count).

Lock-step rows (`ranks` >= 2, for each rank count of the profile's `--ranks`)
---------------------------------------------------------------------------
On `N` one-core ranks of one machine the executor's ranks meet at a collective between every
two of these operations (an all-to-all per sampling hop and feature fetch, the gradient
all-reduce after compute), so each phase lasts as long as the slower rank's, while the ranks
share the machine's memory and caches. One row per operation (the middle shape of its sweep)
times that: `ranks` processes run the operation at the same moment (a barrier before each
repetition, cold caches on every rank), and a repetition's time is the maximum over the ranks
(as the collectives family times a collective). The fit keeps, per rank count, the ratio of
that to the same shape timed alone (`lockstep`: the median over the sampler's operations, the
feature fetch, and the compute operations), which the simulator applies to those stages of
`Nxcpu` with that many ranks (`simulator.gnn.costs.lockstep_factor`).

Cost models (NNLS on relative error, GroupKFold over shapes; terms in `simulator.gnn.costs.OP_TERMS`)
------------------------------------------------------------------------------------------------
    sample          per_edge edges + per_candidate c + per_sorted_candidate c log2(c) + per_row rows
                    + overhead, c = candidate edges (of the rows above the fan-out)
    to_block        per_id ids + per_sorted_id ids log2(ids) + per_node src + overhead, ids = rows + edges
    aggregate*      per_edge_element edges width + per_far_edge_element edges width far + per_edge edges
                    + per_node_element (src + dst) width + overhead; far = 1 - cache / (src width 4 B),
                    the share of source-row reads beyond a cache whose size the fit picks from a grid
    linear*         per_flop flops + per_element rows (width + d_out) + overhead
    relu_dropout    per_element elements + overhead
    gat_attention   per_edge_head (edges + rows) heads + per_edge_element (edges + rows) width
                    + per_node_element (src + rows) width + overhead
    fetch           per_row rows + per_element rows width + overhead
    optimizer       per_param params + overhead
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from functools import cache

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
import torch.nn.functional as F

from executor.allocator import keep_freed_memory
from profiler.context import ProfileContext
from profiler.fit import fit_linear, shape_groups
from profiler.ranks import run_ranks
from profiler.timers import Timer, Timing
from simulator.gnn.costs import CACHE_BYTES_GRID, LOCKSTEP_STAGES, OP_TERMS, op_terms

GRAPH = "community-20k"
SAMPLE_ROWS, SAMPLE_FANOUTS = (250, 1000, 4000, 16000), (5, 10, 15)
FRONTIERS = ("uniform", "edge-end")
AGG_ROWS, AGG_FANOUTS, AGG_WIDTHS = (500, 2000, 8000), (4, 12), (32, 128, 256)
LINEAR_ROWS, LINEAR_DIMS = (1000, 4000, 16000), ((32, 256), (256, 256), (256, 8))
DROPOUT_ROWS, DROPOUT_WIDTHS = (1000, 4000, 16000), (64, 256)
OPTIMIZER_WIDTHS = (32, 64, 128, 256, 512)
FETCH_ROWS, FETCH_WIDTHS, FETCH_TABLE_ROWS = (1000, 4000, 16000), (32, 128, 512), 20_000
GAT_HEADS, GAT_HEAD_DIMS = 4, (8, 64)   # gat-3: 4 heads of 64, the output layer 4 heads of the classes
QUICK = {"sample_rows": (500, 4000), "agg_rows": (500, 4000), "agg_widths": (32, 256), "linear_rows": (1000, 8000),
         "optimizer_widths": (32, 128, 256)}
OPTIMIZER_SEEDS, OPTIMIZER_IN, OPTIMIZER_CLASSES = 1000, 32, 8
DROPOUT_P = 0.5
KEY = ("op", "rows", "fanout", "width", "d_out", "frontier", "ranks")
LOCKSTEP_TIMEOUT_S = 600.0


def sweep(ctx: ProfileContext) -> list[dict]:
    """The shapes to time: none on a GPU (the GNN executor trains on CPU ranks)."""
    if ctx.is_cuda:
        return []
    q = ctx.quick
    sample_rows = QUICK["sample_rows"] if q else SAMPLE_ROWS
    agg_rows, agg_widths = (QUICK["agg_rows"], QUICK["agg_widths"]) if q else (AGG_ROWS, AGG_WIDTHS)
    shapes = [_shape(op, r, f, frontier=kind) for op in ("sample", "to_block") for r in sample_rows
              for f in SAMPLE_FANOUTS for kind in FRONTIERS]
    shapes += [_shape(op, r, f, w) for op in ("aggregate", "aggregate_input") for r in agg_rows
               for f in AGG_FANOUTS for w in agg_widths]
    shapes += [_shape(op, r, 0, d_in, d_out) for op in ("linear", "linear_input")
               for r in (QUICK["linear_rows"] if q else LINEAR_ROWS) for d_in, d_out in LINEAR_DIMS]
    shapes += [_shape("relu_dropout", r, 0, w) for r in DROPOUT_ROWS for w in DROPOUT_WIDTHS]
    shapes += [_shape("optimizer", 0, 0, w) for w in (QUICK["optimizer_widths"] if q else OPTIMIZER_WIDTHS)]
    shapes += [_shape("fetch", r, 0, w) for r in FETCH_ROWS for w in FETCH_WIDTHS]
    shapes += [_shape("gat_attention", r, f, GAT_HEADS * d, d) for r in agg_rows for f in AGG_FANOUTS
               for d in GAT_HEAD_DIMS]
    return shapes + [{**shape, "ranks": n} for n in ctx.ranks if n >= 2 for shape in lockstep_shapes(shapes)]


def lockstep_shapes(shapes: list[dict]) -> list[dict]:
    """The middle shape (in sweep order) of every operation: what the lock-step rows time."""
    by_op: dict[str, list[dict]] = {}
    for shape in shapes:
        by_op.setdefault(shape["op"], []).append(shape)
    return [mine[len(mine) // 2] for mine in by_op.values()]


def _shape(op: str, rows: int, fanout: int, width: int = 0, d_out: int = 0, frontier: str = "uniform") -> dict:
    return {"op": op, "rows": rows, "fanout": fanout, "width": width, "d_out": d_out, "frontier": frontier, "ranks": 1}


@cache
def _graph():
    from simulator.gnn.graph import build_graph  # noqa: PLC0415 - built only when sampling is measured
    from simulator.specs.catalog import load_graph  # noqa: PLC0415

    return build_graph(load_graph(GRAPH))


def _sampler():
    from executor.gnn.exchange import Exchange  # noqa: PLC0415 - the executor's own sampler, one rank
    from executor.gnn.sampler import DistSampler  # noqa: PLC0415

    g = _graph()
    return DistSampler(g.indptr, g.indices, np.arange(g.num_nodes), np.zeros(g.num_nodes, dtype=np.int64),
                       [1], Exchange(0, 1), seed=0)


def _frontier(rows: int, kind: str, rng: np.random.Generator) -> np.ndarray:
    """`rows` distinct nodes: uniform, or ends of uniformly drawn edges (degree-biased, in order
    of first draw), as a sampled hop's new nodes are."""
    g = _graph()
    rows = min(rows, g.num_nodes)
    if kind == "uniform":
        return rng.choice(g.num_nodes, size=rows, replace=False).astype(np.int64)
    ends = g.indices[rng.integers(0, g.indices.size, 8 * rows)].astype(np.int64)
    _, first = np.unique(ends, return_index=True)
    picked = ends[np.sort(first)][:rows]
    if picked.size < rows:   # a small graph's hubs run out: fill with uniform nodes
        rest = np.setdiff1d(np.arange(g.num_nodes), picked)
        picked = np.concatenate([picked, rng.choice(rest, size=rows - picked.size, replace=False)])
    return picked


def _random_block(rows: int, fanout: int, rng: np.random.Generator):
    from executor.gnn.sampler import Block  # noqa: PLC0415

    edges = rows * fanout
    src_nodes = rows + edges // 4
    dst = torch.from_numpy(np.repeat(np.arange(rows), fanout))
    src = torch.from_numpy(rng.integers(0, src_nodes, edges))
    return Block(src_nodes, rows, src, dst, np.arange(src_nodes))


def _gnn_params(width: int) -> list[torch.nn.Parameter]:
    dims = [OPTIMIZER_IN, width, width, OPTIMIZER_CLASSES]
    layers = [torch.nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:])]
    layers += [torch.nn.Linear(a, b, bias=False) for a, b in zip(dims[:-1], dims[1:])]  # GraphSAGE's fc_neigh
    return [p for layer in layers for p in layer.parameters()]


def _operation(shape: dict, rng: np.random.Generator) -> tuple[callable, dict]:
    """The timed callable for `shape` and the counts it handles (src, edges, elements, params)."""
    from executor.gnn.model import dropout, gat_attention, mean_of_neighbors  # noqa: PLC0415
    from executor.gnn.sampler import to_block  # noqa: PLC0415

    op, rows, fanout, width, d_out = (shape[k] for k in ("op", "rows", "fanout", "width", "d_out"))
    counts = {"src": 0, "edges": 0, "candidates": 0, "elements": 0, "params": 0}
    if op in ("sample", "to_block"):
        sampler, frontier = _sampler(), _frontier(rows, shape.get("frontier", "uniform"), rng)
        dst_of_edge, nbrs = sampler._one_hop(frontier, fanout)
        block, _ = to_block(frontier, dst_of_edge, nbrs)
        degree = sampler.indptr[frontier + 1] - sampler.indptr[frontier]
        counts.update(src=block.num_src, edges=int(nbrs.size), candidates=int(degree[degree > fanout].sum()))
        if op == "sample":
            return (lambda: sampler._one_hop(frontier, fanout)), counts
        return (lambda: to_block(frontier, dst_of_edge, nbrs)), counts
    if op.startswith("aggregate"):
        block = _random_block(rows, fanout, rng)
        h = torch.randn(block.num_src, width, requires_grad=op == "aggregate")
        counts.update(src=block.num_src, edges=rows * fanout)

        def aggregate():
            out = mean_of_neighbors(h, block)
            out.backward(torch.ones_like(out)) if h.requires_grad else None
        return aggregate, counts
    if op.startswith("linear"):
        layer = torch.nn.Linear(width, d_out)
        x = torch.randn(rows, width, requires_grad=op == "linear")

        def linear():
            layer(x).sum().backward()
        return linear, counts
    if op == "relu_dropout":
        x = torch.randn(rows, width, requires_grad=True)
        counts.update(elements=rows * width)
        return (lambda: dropout(F.relu(x), DROPOUT_P, True).sum().backward()), counts
    if op == "gat_attention":
        block, heads = _random_block(rows, fanout, rng), width // d_out
        z = torch.randn(block.num_src, heads, d_out, requires_grad=True)
        attn_src, attn_dst = (torch.randn(heads, d_out, requires_grad=True) for _ in range(2))
        counts.update(src=block.num_src, edges=rows * fanout)

        def attention():
            gat_attention(z, block, attn_src, attn_dst).sum().backward()
        return attention, counts
    if op == "fetch":
        from executor.gnn.exchange import Exchange  # noqa: PLC0415
        from executor.gnn.features import FeatureStore  # noqa: PLC0415

        table = rng.standard_normal((FETCH_TABLE_ROWS, width), dtype=np.float32)
        store = FeatureStore(table, np.arange(FETCH_TABLE_ROWS), np.zeros(FETCH_TABLE_ROWS, dtype=np.int64),
                             Exchange(0, 1), replicated=True)
        ids = rng.choice(FETCH_TABLE_ROWS, size=rows, replace=False).astype(np.int64)
        return (lambda: store.fetch(ids, {})), counts
    if op == "optimizer":
        params = _gnn_params(width)
        for p in params:
            p.grad = torch.zeros_like(p)
        adam = torch.optim.Adam(params, lr=3e-3)
        logits = torch.randn(OPTIMIZER_SEEDS, OPTIMIZER_CLASSES, requires_grad=True)
        labels = torch.from_numpy(rng.integers(0, OPTIMIZER_CLASSES, OPTIMIZER_SEEDS))
        counts.update(params=sum(p.numel() for p in params))

        def step():
            adam.zero_grad(set_to_none=False)
            F.cross_entropy(logits, labels).backward()
            adam.step()
        return step, counts
    raise ValueError(f"unknown gnn op {op!r}")


FLUSH_BYTES = 64 * 2**20
"""Written before every timed call: more than the last-level cache, so each call starts cold."""


@cache
def _flush_buffer() -> np.ndarray:
    return np.zeros(FLUSH_BYTES // 8)


def flush_caches() -> None:
    """Evict the caches: in a training step every operation's inputs were last touched several
    operations (and tens of MB) ago, not by the same call a moment before."""
    _flush_buffer()[:] += 1.0


def measure(ctx: ProfileContext, shapes: list[dict]) -> Iterator[dict]:
    """Rows in input order: a shape timed alone, or (`ranks` >= 2) on that many ranks at once,
    which are spawned once per rank count and time all of its shapes. Both with freed memory
    kept in the process (executor/allocator.py), as the executor's ranks run (`run_ranks`
    sets it in every rank; here it stays set for the rest of this process)."""
    keep_freed_memory()
    rng = np.random.default_rng(0)
    lockstep: dict[int, list[dict]] = {}
    for shape in shapes:
        if shape.get("ranks", 1) >= 2:
            lockstep.setdefault(int(shape["ranks"]), []).append(shape)
    done: dict[tuple, dict] = {}
    for shape in shapes:
        n = int(shape.get("ranks", 1))
        if n < 2:
            fn, counts = _operation(shape, rng)
            yield {**_key(shape), **counts, **ctx.timer.measure(fn, setup=flush_caches).row()}
            continue
        if n in lockstep:   # the first shape of its rank count: spawn the ranks, time them all
            group = lockstep.pop(n)
            results = run_ranks(_lockstep_rank, n, "gloo", ctx.threads, (group, ctx.timer), LOCKSTEP_TIMEOUT_S)
            for s, (counts, samples) in zip(group, results[0], strict=True):
                done[tuple(_key(s).values())] = {**_key(s), **counts, **Timing.of(samples).row()}
        yield done.pop(tuple(_key(shape).values()))


def _key(shape: dict) -> dict:
    return {k: shape.get(k, "uniform" if k == "frontier" else 1 if k == "ranks" else 0) for k in KEY}


def _lockstep_rank(rank: int, world_size: int, shapes: list[dict], timer: Timer) -> list[tuple[dict, list[float]]]:
    """Inside each rank: every shape's repetitions, all ranks starting together (a barrier),
    each repetition the slowest rank's seconds (the same lists on every rank)."""
    rng = np.random.default_rng(rank)
    out = []
    for shape in shapes:
        fn, counts = _operation(shape, rng)
        for _ in range(max(1, timer.warmup)):
            fn()
        samples: list[float] = []
        while len(samples) < timer.reps and (len(samples) < timer.min_reps or sum(samples) < timer.budget_s):
            flush_caches()
            dist.barrier()
            t0 = time.perf_counter()
            fn()
            worst = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
            dist.all_reduce(worst, op=dist.ReduceOp.MAX)
            samples.append(float(worst.item()))
        out.append((counts, samples))
    return out


def features(df: pd.DataFrame, op: str, cache_bytes: float = 0.0) -> pd.DataFrame:
    """The cost model's terms of `op` for every row (the simulator computes the same ones)."""
    candidates = df["candidates"] if "candidates" in df else df["edges"]   # older tables: sampled edges
    cols = [op_terms(op, rows=r.rows, src=r.src, edges=r.edges, width=r.width, d_out=r.d_out, elements=r.elements,
                     params=r.params, cache_bytes=cache_bytes, candidates=c) for r, c in zip(df.itertuples(), candidates)]
    return pd.DataFrame(cols, index=df.index, columns=list(OP_TERMS[op]), dtype=float)


def _cv(lf) -> float:
    return float(np.median(lf.cv_errors)) if len(lf.cv_errors) else float("inf")


def fit(df: pd.DataFrame, device_meta: dict) -> dict:
    ranks = df["ranks"] if "ranks" in df else pd.Series(1, index=df.index)
    out: dict = {"lockstep": lockstep_fit(df[ranks == 1], df[ranks >= 2])} if (ranks >= 2).any() else {}
    df = df[ranks == 1]
    errors = []
    for op, part in df.groupby("op", sort=False):
        if str(op) not in OP_TERMS or len(part) < 2:
            continue
        groups = shape_groups(part, ["rows", "fanout", "width", "d_out"])
        if str(op).startswith("aggregate"):   # the cache size that cross-validates best
            fits = [(fit_linear(features(part, str(op), c), part["median_s"], groups), c) for c in CACHE_BYTES_GRID]
            lf, cache = min(fits, key=lambda fc: _cv(fc[0]))
            out[str(op)] = {**lf.coef, **lf.summary(), "cache_bytes": cache}
        else:
            lf = fit_linear(features(part, str(op)), part["median_s"], groups)
            out[str(op)] = {**lf.coef, **lf.summary()}
        errors.append(lf.cv_errors)
    pooled = np.concatenate(errors) if errors else np.array([])
    return {**out, "cv_median_abs_error": float(np.median(pooled)) if len(pooled) else None, "samples": len(df)}


def lockstep_fit(alone: pd.DataFrame, together: pd.DataFrame) -> dict:
    """Per rank count: each lock-step row over the same shape timed alone, and the median of
    those ratios over each stage's operations (`LOCKSTEP_STAGES`)."""
    solo = {tuple(_key(r).values())[:-1]: r["median_s"] for r in alone.to_dict("records")}
    out: dict = {}
    for n, rows in together.groupby("ranks", sort=True):
        by_op = {}
        for r in rows.to_dict("records"):
            base = solo.get(tuple(_key(r).values())[:-1])
            if base and base > 0:
                by_op[str(r["op"])] = float(r["median_s"] / base)
        stages = {stage: float(np.median([by_op[op] for op in ops if op in by_op]))
                  for stage, ops in LOCKSTEP_STAGES.items() if any(op in by_op for op in ops)}
        out[str(int(n))] = {**stages, "by_op": by_op}
    return out
