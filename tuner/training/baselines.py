"""Baselines on the same simulator: the best Megatron-LM plan, and an Aceso-style search.

Megatron-LM exposes uniform layers per stage, recompute none / selective / full,
the distributed optimizer on or off (ZeRO-1 or plain DP), the DP/TP/PP/micro-batch grid and
the interleaved schedule, and no offloading. Its best plan is found exhaustively over that
space with the closed-form model, and the best few are re-simulated.

The Aceso-style search (Liu et al., EuroSys'24) starts from the best Megatron-LM plans and
repeatedly applies the move that most relieves the bottleneck: move a layer off the slowest
stage (v layers under the interleaved schedule, whose chunks must stay equal), checkpoint fewer layers on it (or more on a stage that overflows), or trade TP for DP.
It keeps per-stage layer counts and checkpointing but, like Aceso, no ZeRO-3 and no offload.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from simulator.training import simulate_training
from tuner.training.analytic import pipeline_time_s
from tuner.training.layout_eval import Counters, LayoutEvaluator
from tuner.training.plans import build_plan
from tuner.training.search import Tuned
from tuner.training.space import Layout, layouts, option_grid

MEGATRON_ZERO = (0, 1)
RESIMULATE = 3


def _megatron_layouts(model, cluster, global_batch_size):
    for lay in layouts(model, cluster, global_batch_size, sharded=False):
        per_stage = model.num_layers // lay.pp
        if model.num_layers % lay.pp == 0 and per_stage % lay.virtual_stages == 0:
            yield lay


def _evaluator(model, cluster, lay, seq, counters):
    grid = option_grid(lay.dp, offload_levels=(0.0,), zero_stages=MEGATRON_ZERO)
    return LayoutEvaluator(model, cluster, lay, seq, counters, grid=grid)


def megatron_candidates(model, cluster, global_batch_size, seq, counters):
    """(analytic time, layout, rows) of every fitting plan in Megatron-LM's space."""
    out = []
    for lay in _megatron_layouts(model, cluster, global_batch_size):
        ev = _evaluator(model, cluster, lay, seq, counters)
        layers = model.num_layers // lay.pp
        tables = [ev.table(layers, i, (0, layers)) for i in range(lay.pp)]
        fits = np.all([ev._fits(t, i) for i, t in enumerate(tables)], axis=0)
        ks = tables[0].options["k"]
        for row in np.flatnonzero(fits):
            if lay.selective and ks[row] > 0:
                continue  # full recompute: the selective flag is moot; count the plan once
            T = [t.T[row] for t in tables]
            D = [t.D[row] for t in tables]
            time_s = pipeline_time_s(T, D, lay.num_microbatches, lay.virtual_stages, ev.p2p_s())
            out.append((time_s, lay, [(t, int(row)) for t in tables]))
    out.sort(key=lambda c: c[0])
    return out


def _best_simulated(model, cluster, candidates, global_batch_size, seq, name) -> Tuned:
    best = None
    for time_s, lay, rows in candidates[:RESIMULATE]:
        plan = build_plan(lay, rows, global_batch_size, seq, name=name)
        report = simulate_training(model, cluster, plan)
        if report.feasible and (best is None or report.iteration_time_s < best.report.iteration_time_s):
            best = Tuned(plan, report, time_s)
    return best


def megatron_baseline(model, cluster, global_batch_size, seq, screened=None) -> Tuned | None:
    cands = megatron_candidates(model, cluster, global_batch_size, seq, Counters())
    return _best_simulated(model, cluster, cands, global_batch_size, seq, "megatron-lm-best")


class _AcesoState:
    """Layout + per-stage (layers, checkpointed) with a fixed ZeRO choice, no offload."""

    def __init__(self, model, cluster, seq, counters, lay: Layout, layers, ks, zero_row: int):
        self.model, self.cluster, self.seq, self.counters = model, cluster, seq, counters
        self.lay, self.layers, self.ks, self.zero_row = lay, list(layers), list(ks), zero_row
        self.ev = _evaluator(model, cluster, lay, seq, counters)

    def rows(self):
        out = []
        for i, (n, k) in enumerate(zip(self.layers, self.ks)):
            t = self.ev.table(n, i)
            out.append((t, self.zero_row * (n + 1) + k))
        return out

    def score(self) -> tuple[float, list[float], list[bool]]:
        rows = self.rows()
        T = [t.T[r] for t, r in rows]
        D = [t.D[r] for t, r in rows]
        fits = [t.fits(self.ev.inflight(i), self.ev.capacity, self.ev.host_capacity)[r] for i, (t, r) in enumerate(rows)]
        time_s = pipeline_time_s(T, D, self.lay.num_microbatches, self.lay.virtual_stages, self.ev.p2p_s())
        return (time_s if all(fits) else np.inf), T, fits

    def moves(self, legal: set[Layout]):
        _, T, fits = self.score()
        slow = int(np.argmax(T))
        v = self.lay.virtual_stages
        for j in (slow - 1, slow + 1):  # with v chunks a stage moves v layers (equal chunks)
            if 0 <= j < len(self.layers) and self.layers[slow] > v:
                layers = list(self.layers)
                layers[slow] -= v
                layers[j] += v
                ks = [min(k, n) for k, n in zip(self.ks, layers)]
                yield self._with(layers=layers, ks=ks)
        if self.ks[slow] > 0:
            yield self._with(ks=[k - (i == slow) for i, k in enumerate(self.ks)])
        for i, ok in enumerate(fits):
            if not ok and self.ks[i] < self.layers[i]:
                yield self._with(ks=[k + (j == i) for j, k in enumerate(self.ks)])
        for tp, dp in ((self.lay.tp * 2, self.lay.dp // 2), (self.lay.tp // 2, self.lay.dp * 2)):
            other = replace(self.lay, tp=tp, dp=dp, sequence_parallel=self.lay.sequence_parallel and tp > 1)
            if other in legal:
                yield _AcesoState(self.model, self.cluster, self.seq, self.counters, other,
                                  self.layers, self.ks, min(self.zero_row, 0 if dp == 1 else self.zero_row))

    def _with(self, layers=None, ks=None):
        new = _AcesoState.__new__(_AcesoState)
        new.__dict__.update(self.__dict__)
        new.layers, new.ks = list(layers or self.layers), list(ks or self.ks)
        return new


def aceso_baseline(model, cluster, global_batch_size, seq, screened=None, starts: int = 3,
                   max_steps: int = 200) -> Tuned | None:
    counters = Counters()
    legal = set(layouts(model, cluster, global_batch_size, sharded=False))
    finals = []
    for _, lay, rows in megatron_candidates(model, cluster, global_batch_size, seq, counters)[:starts]:
        table, row = rows[0]
        n, opt = table.layers, table.option(row)
        zero_row, k = int(np.flatnonzero(np.unique(table.options["zero"]) == opt["zero"])[0]), int(opt["k"])
        state = _AcesoState(model, cluster, seq, counters, lay, [n] * lay.pp, [k] * lay.pp, zero_row)
        best = state.score()[0]
        for _ in range(max_steps):
            scored = [(m.score()[0], m) for m in state.moves(legal)]
            if not scored:
                break
            score, move = min(scored, key=lambda s: s[0])
            if score >= best * (1 - 1e-9):
                break
            state, best = move, score
        finals.append((best, state.lay, state.rows()))
    finals.sort(key=lambda c: c[0])
    return _best_simulated(model, cluster, finals, global_batch_size, seq, "aceso-style")


BASELINES = {"megatron": megatron_baseline, "aceso": aceso_baseline}
