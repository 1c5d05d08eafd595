"""TrainingReport: what one simulated training iteration predicts, as data and as plots."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

BREAKDOWN_KEYS = (
    "compute", "recompute", "tp_comm", "pp_comm", "dp_comm", "pipeline_bubble",
    "offload_stall", "optimizer",
)
"""Named parts of the iteration time on the critical (slowest) stage; they sum to it."""


@dataclass
class StageReport:
    stage: int
    layers: int
    checkpointed_layers: int
    memory_bytes: float
    memory: dict[str, float]          # weights, gradients, optimizer, activations, other
    host_memory_bytes: float          # offloaded states and activations in host memory
    peak_inflight_microbatches: int
    busy_s: float                     # compute-stream time (forward + backward + recompute)
    end_s: float


@dataclass
class TrainingReport:
    model: str
    cluster: str
    num_devices: int
    iteration_time_s: float
    tokens_per_s: float
    mfu: float                        # model FLOPs (no recompute) / (time x devices x 16-bit peak)
    hfu: float                        # hardware FLOPs (with recompute) / same
    model_flops_per_iteration: float
    peak_memory_bytes: float
    device_memory_bytes: float
    feasible: bool
    infeasible_reason: str | None
    breakdown: dict[str, float]
    stages: list[StageReport]
    plan: dict[str, Any] = field(default_factory=dict)
    cost_sources: dict[str, str] = field(default_factory=dict)  # cost -> datasheet | measured <date> (<profile>)
    price_per_device_hour: float | None = None  # USD, from the cluster spec; None: costs unknown

    @property
    def model_tflops_per_device(self) -> float:
        return self.model_flops_per_iteration / self.iteration_time_s / self.num_devices / 1e12

    @property
    def cost_per_iteration_usd(self) -> float | None:
        """All devices' rent for one iteration, at the cluster's price per device-hour."""
        if self.price_per_device_hour is None:
            return None
        return self.price_per_device_hour * self.num_devices * self.iteration_time_s / 3600.0

    @property
    def cost_per_million_tokens_usd(self) -> float | None:
        """Rent per million trained tokens: cost per iteration over tokens per iteration."""
        cost = self.cost_per_iteration_usd
        if cost is None:
            return None
        return cost / (self.tokens_per_s * self.iteration_time_s) * 1e6

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["model_tflops_per_device"] = self.model_tflops_per_device
        out["cost_per_iteration_usd"] = self.cost_per_iteration_usd
        out["cost_per_million_tokens_usd"] = self.cost_per_million_tokens_usd
        return out

    def plot_memory(self, ax=None):
        """Stacked bars of per-stage peak memory by kind, with the device limit."""
        import matplotlib.pyplot as plt

        ax = ax or plt.subplots(figsize=(7, 3.5))[1]
        bottom = [0.0] * len(self.stages)
        for kind in ("weights", "gradients", "optimizer", "activations", "other"):
            vals = [s.memory[kind] / 2**30 for s in self.stages]
            ax.bar([s.stage for s in self.stages], vals, bottom=bottom, label=kind)
            bottom = [b + v for b, v in zip(bottom, vals)]
        ax.axhline(self.device_memory_bytes / 2**30, color="k", ls="--", lw=1, label="device memory")
        ax.set_xticks([s.stage for s in self.stages])
        ax.set_xlabel("pipeline stage")
        ax.set_ylabel("peak memory (GiB)")
        ax.legend(fontsize=8)
        return ax

    def plot_breakdown(self, ax=None):
        """Horizontal bar of the iteration-time breakdown."""
        import matplotlib.pyplot as plt

        ax = ax or plt.subplots(figsize=(7, 1.6))[1]
        left = 0.0
        for key in BREAKDOWN_KEYS:
            v = self.breakdown.get(key, 0.0)
            if v > 0:
                ax.barh([0], [v], left=left, label=key)
                left += v
        ax.set_yticks([])
        ax.set_xlabel("seconds")
        ax.legend(fontsize=7, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.6))
        return ax
