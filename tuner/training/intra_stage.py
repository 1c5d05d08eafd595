"""Intra-stage search: every memory option of a stage candidate at once, and its Pareto frontier.

A stage candidate is (layers, first/last position) under a `Layout`. `stage_table` evaluates
the vectorized stage model over the whole option grid (ZeRO stage x offload fractions x
checkpointed layers) in one call and keeps, per option, the two objectives of Mist:
- T: steady-state time of one micro-batch (forward + backward + recompute + stalls);
- D: extra time at the accumulation boundary (exposed gradient sync, optimizer step,
  parameter all-gather);
and the memory it needs, split so that the peak for any number of in-flight micro-batches
is `states + inflight * act + fixed`. `frontier` keeps, for one stage index, the options
that fit in memory and are not dominated in (T, D), sampled to a bounded number of points.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from simulator.training.stage_model import StageModel


@dataclass
class StageTable:
    layers: int
    first: bool
    last: bool
    options: dict[str, np.ndarray]  # the option values of every row (incl. k)
    T: np.ndarray
    D: np.ndarray
    states: np.ndarray  # weights + gradients + optimizer states, bytes
    act: np.ndarray     # activations of one in-flight micro-batch, bytes
    fixed: np.ndarray   # recompute buffer + logits, bytes
    host_states: np.ndarray  # offloaded model states in host memory, bytes
    host_act: np.ndarray     # offloaded activations of one in-flight micro-batch, bytes

    def __len__(self) -> int:
        return len(self.T)

    def memory(self, inflight: float) -> np.ndarray:
        return self.states + inflight * self.act + self.fixed

    def host_memory(self, inflight: float) -> np.ndarray:
        return self.host_states + inflight * self.host_act

    def fits(self, inflight: float, capacity_bytes: float, host_capacity_bytes: float) -> np.ndarray:
        return (self.memory(inflight) <= capacity_bytes) & (self.host_memory(inflight) <= host_capacity_bytes)

    def option(self, row: int) -> dict[str, float]:
        return {key: float(val[row]) for key, val in self.options.items()}


def stage_table(stage_model: StageModel, grid: dict[str, np.ndarray], layers: int, first: bool,
                last: bool, fixed_options: dict[str, float], k_values=None) -> StageTable:
    """Evaluate every (grid option, checkpointed layers k) of one stage candidate."""
    ks = np.arange(layers + 1, dtype=float) if k_values is None else np.asarray(k_values, dtype=float)
    n = len(next(iter(grid.values())))
    options = {key: np.repeat(val, len(ks)) for key, val in grid.items()}
    options["k"] = np.tile(ks, n)
    out = stage_model.evaluate({**fixed_options, **options}, layers, first, last)
    fwd = sum(v for key, v in out.items() if key.startswith("fwd_"))
    bwd = sum(v for key, v in out.items() if key.startswith("bwd_"))
    # Gradient buckets overlap the last backward (as the engine models it): all but the last
    # layer's share can hide behind the backward of the layers before it.
    g = out["grad_sync_s"]
    exposed = np.maximum(g / layers, g - bwd * (layers - 1) / layers)
    D = exposed + out["optimizer_s"] + out["param_sync_s"]
    size = len(options["k"])
    full = lambda x: np.broadcast_to(np.asarray(x, dtype=float), (size,))  # noqa: E731
    return StageTable(
        layers, first, last, options, full(fwd + bwd), full(D),
        full(out["weights"] + out["gradients"] + out["optimizer"]), full(out["activation_bytes"]),
        full(out["recompute_buffer"] + out["zero3_buffer"] + out["logits"]), full(out["host_states"]),
        full(out["host_activation_bytes"]),
    )


def pareto_frontier(T: np.ndarray, D: np.ndarray, max_points: int | None = None) -> np.ndarray:
    """Row indices of the (T, D) Pareto frontier, fastest first; at most `max_points`,
    sampled evenly along the frontier (always keeping both ends)."""
    if len(T) == 0:
        return np.array([], dtype=int)
    order = np.lexsort((D, T))
    best_d = np.minimum.accumulate(D[order])
    keep = np.concatenate(([True], D[order][1:] < best_d[:-1]))
    front = order[keep]
    if max_points is not None and len(front) > max_points:
        pick = np.unique(np.round(np.linspace(0, len(front) - 1, max_points)).astype(int))
        front = front[pick]
    return front


def frontier(table: StageTable, fits: np.ndarray, max_points: int | None) -> np.ndarray:
    """Frontier rows of `table` among the rows where `fits` (memory) holds."""
    fits = np.flatnonzero(fits)
    return fits[pareto_frontier(table.T[fits], table.D[fits], max_points)]
