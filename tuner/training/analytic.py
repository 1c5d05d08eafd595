"""Closed-form iteration time of a pipeline from per-stage times (Mist, Zhu et al. EuroSys'25).

With T_i the time of one micro-batch (forward + backward) on stage i and D_i the extra time
stage i spends at the accumulation boundary (exposed gradient sync, optimizer step,
parameter all-gather), 1F1B with m micro-batches takes

    (m - 1) * max_i T_i + sum_i T_i + max_i (D_i - sum_{j<i} T_j)

since stage i finishes its backward work about sum_{j<i} T_j before stage 0 does. Interleaving
with v chunks divides the fill and drain by v: m * max T + (sum T - max T) / v. Every
micro-batch boundary crossing adds its point-to-point time during fill and drain.
"""

from __future__ import annotations

import numpy as np


def pipeline_time_s(T, D, num_microbatches: int, virtual_stages: int = 1, p2p_s: float = 0.0) -> float:
    T, D = np.asarray(T, dtype=float), np.asarray(D, dtype=float)
    m, v, p = num_microbatches, virtual_stages, len(T)
    t_max = T.max()
    steady = (m - 1) * t_max + T.sum() if v == 1 else m * t_max + (T.sum() - t_max) / v
    hidden_before = np.concatenate(([0.0], np.cumsum(T)[:-1]))
    boundary = max(0.0, float(np.max(D - hidden_before)))
    return float(steady + boundary + 2 * (p - 1) * p2p_s)
