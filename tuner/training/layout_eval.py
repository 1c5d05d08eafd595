"""Everything the tuner evaluates for one `Layout`: stage tables, screening, MILP candidates.

Tables are cached per (layers, position, k grid), so screening, the MILP and the baselines
share evaluations of the same stage candidates.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from simulator.costs import comm
from simulator.costs.symbols import GRAD_BYTES
from simulator.specs.hardware import ClusterSpec
from simulator.specs.model import TransformerSpec
from simulator.specs.plan import split_layers
from simulator.training.stage_model import StageModel
from tuner.training.analytic import pipeline_time_s
from tuner.training.inter_stage import Candidate
from tuner.training.intra_stage import StageTable, frontier, stage_table
from tuner.training.space import Layout, inflight_microbatches, layer_band, layout_grid


@dataclass
class Counters:
    """`feasible` + `infeasible` stage-option evaluations (memory check and time) were made;
    `cost_rows` counts rows of the vectorized cost model behind them (tables are shared)."""

    feasible: int = 0
    infeasible: int = 0
    cost_rows: int = 0

    @property
    def evaluated(self) -> int:
        return self.feasible + self.infeasible


@dataclass
class Screening:
    """Uniform-layer estimate of a layout: each stage takes its fastest fitting option."""

    layout: Layout
    time_s: float | None            # None when some stage fits no option
    shortfall_bytes: float          # > 0: the smallest overflow of the worst stage
    need_bytes: tuple[float, float] = (0.0, 0.0)  # (device, host) memory of that closest option
    rows: list[tuple[StageTable, int]] = field(default_factory=list)


class LayoutEvaluator:
    def __init__(self, model: TransformerSpec, cluster: ClusterSpec, layout: Layout, seq_length: int,
                 counters: Counters, grid: dict[str, np.ndarray] | None = None,
                 flash_attention: bool = True, gradient_dtype: str = "bf16"):
        self.model, self.cluster, self.layout, self.counters = model, cluster, layout, counters
        self.stage_model = StageModel(model, cluster, layout.tp, layout.dp, layout.micro_batch_size, seq_length,
                                      dp_shard=layout.dp_shard, num_microbatches=layout.num_microbatches)
        self.grid = grid if grid is not None else layout_grid(layout, cluster.host_offload)
        self.fixed = {"sq": float(layout.sequence_parallel), "sel": float(layout.selective),
                      "flash": float(flash_attention), "gb": float(GRAD_BYTES[gradient_dtype])}
        self.capacity = cluster.device.memory_bytes
        self.host_capacity = cluster.host_memory_bytes_per_device
        self._tables: dict[tuple, StageTable] = {}

    def position(self, stage: int) -> tuple[bool, bool]:
        return stage == 0, stage == self.layout.pp - 1

    def inflight(self, stage: int) -> float:
        lay = self.layout
        return inflight_microbatches(stage, lay.pp, lay.num_microbatches, lay.virtual_stages)

    def table(self, layers: int, stage: int, k_values: tuple | None = None) -> StageTable:
        first, last = self.position(stage)
        key = (layers, first, last, k_values)
        if key not in self._tables:
            self._tables[key] = stage_table(self.stage_model, self.grid, layers, first, last, self.fixed, k_values)
            self.counters.cost_rows += len(self._tables[key])
        return self._tables[key]

    def p2p_s(self) -> float:
        if self.layout.pp == 1:
            return 0.0
        c = self.stage_model.costs({"sq": self.fixed["sq"]}, 1.0)
        return float(comm.p2p_s(c["pp_p2p_bytes"], self.stage_model.links.pp))

    def _fits(self, table: StageTable, stage: int) -> np.ndarray:
        fits = table.fits(self.inflight(stage), self.capacity, self.host_capacity)
        self.counters.feasible += int(fits.sum())
        self.counters.infeasible += int(fits.size - fits.sum())
        return fits

    def uniform_layers(self) -> list[int]:
        """As even as possible; with v virtual stages, multiples of v."""
        v = self.layout.virtual_stages
        return [n * v for n in split_layers(self.model.num_layers // v, self.layout.pp)]

    def screen(self, coarse: bool = True) -> Screening:
        """Uniform layers; every stage takes the fitting option that minimizes its share of
        the iteration, m * T + D."""
        lay, rows, shortfall, need = self.layout, [], 0.0, (0.0, 0.0)
        for i, layers in enumerate(self.uniform_layers()):
            ks = (0, layers // 2, layers) if coarse else None
            table = self.table(layers, i, ks)
            fits = self._fits(table, i)
            if not fits.any():
                device, on_host = table.memory(self.inflight(i)), table.host_memory(self.inflight(i))
                over = np.maximum(device - self.capacity, on_host - self.host_capacity)
                best = int(np.argmin(over))
                if over[best] > shortfall:
                    shortfall, need = float(over[best]), (float(device[best]), float(on_host[best]))
                continue
            idx = np.flatnonzero(fits)
            share = lay.num_microbatches * table.T[idx] + table.D[idx]
            rows.append((table, int(idx[np.argmin(share)])))
        if shortfall > 0:
            return Screening(lay, None, shortfall, need)
        T = [t.T[r] for t, r in rows]
        D = [t.D[r] for t, r in rows]
        return Screening(lay, pipeline_time_s(T, D, lay.num_microbatches, lay.virtual_stages, self.p2p_s()), 0.0, rows)

    def candidates(self, max_points: int | None, band_width: float = 0.25) -> list[list[Candidate]]:
        """Per stage: every layer count in the band x its memory-feasible Pareto points."""
        lay = self.layout
        band = layer_band(self.model.num_layers, lay.pp, lay.virtual_stages, band_width)
        out = []
        for i in range(lay.pp):
            cands = []
            for layers in band:
                table = self.table(layers, i)
                for row in frontier(table, self._fits(table, i), max_points):
                    cands.append(Candidate(layers, float(table.T[row]), float(table.D[row]), (table, int(row))))
            out.append(cands)
        return out
