"""Exhaustive search over the tuner's space, for small models: the yardstick in tests.

For every layout and every split of the layers over the stages, every combination of the
stages' memory options (no frontier, no sampling, no MILP) is scored with the same closed
form the tuner optimizes. The combinations are enumerated with numpy broadcasting, so this
is exact but exponential in the number of stages: use it on debug-sized spaces.
"""

from __future__ import annotations

import itertools

import numpy as np

from tuner.training.layout_eval import Counters, LayoutEvaluator
from tuner.training.space import Layout, layer_band, layouts

MAX_COMBINATIONS = 20_000_000


def _splits(num_layers: int, band: list[int], pp: int):
    for split in itertools.product(band, repeat=pp):
        if sum(split) == num_layers:
            yield split


def _best_for_split(ev: LayoutEvaluator, split) -> float:
    lay = ev.layout
    Ts, Ds = [], []
    for i, n in enumerate(split):
        table = ev.table(n, i)
        fits = table.fits(ev.inflight(i), ev.capacity, ev.host_capacity)
        if not fits.any():
            return np.inf
        Ts.append(table.T[fits])
        Ds.append(table.D[fits])
    if np.prod([len(t) for t in Ts], dtype=float) > MAX_COMBINATIONS:
        raise ValueError(f"space too large for exhaustive search: {[len(t) for t in Ts]} options per stage")
    p, m, v = lay.pp, lay.num_microbatches, lay.virtual_stages
    shape = lambda i: [-1 if j == i else 1 for j in range(p)]  # noqa: E731
    T = [t.reshape(shape(i)) for i, t in enumerate(Ts)]
    D = [d.reshape(shape(i)) for i, d in enumerate(Ds)]
    t_max = T[0]
    for t in T[1:]:
        t_max = np.maximum(t_max, t)
    total = sum(T)
    steady = (m - 1) * t_max + total if v == 1 else m * t_max + (total - t_max) / v
    before = np.zeros(1)
    boundary = np.zeros(1)
    for i in range(p):
        boundary = np.maximum(boundary, D[i] - before)
        before = before + T[i]
    return float(np.min(steady + boundary)) + 2 * (p - 1) * ev.p2p_s()


def exhaustive_best(model, cluster, global_batch_size: int, seq_length: int, **space) -> tuple[float, Layout]:
    """(closed-form time, layout) of the best plan in the whole space."""
    best = (np.inf, None)
    for lay in layouts(model, cluster, global_batch_size, **space):
        ev = LayoutEvaluator(model, cluster, lay, seq_length, Counters())
        band = layer_band(model.num_layers, lay.pp, lay.virtual_stages)
        for split in _splits(model.num_layers, band, lay.pp):
            t = _best_for_split(ev, split)
            if t < best[0]:
                best = (t, lay)
    return best
