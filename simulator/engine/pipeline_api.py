"""Inputs and outputs of the pipeline-iteration simulation (see pipeline.py for the engine).

The cost model (simulator/costs) turns a plan into these per-op durations; the engine only
orders and overlaps them. Every duration carries a named breakdown whose values sum to it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Schedule = Literal["gpipe", "1f1b", "interleaved"]


@dataclass(frozen=True)
class OpCost:
    """One forward or backward of one micro-batch through one model chunk on one stage.

    `parts` names where the time goes (e.g. {"compute": .., "tp_comm": .., "recompute": ..,
    "offload_stall": .., "zero3_comm": ..}); the op lasts sum(parts) on the compute stream.
    """

    parts: dict[str, float]

    @property
    def duration_s(self) -> float:
        return sum(self.parts.values())


@dataclass(frozen=True)
class ChunkCost:
    """Costs of one model chunk (a virtual stage) held by one pipeline stage."""

    forward: OpCost
    backward: OpCost
    layers: int                   # transformer layers in the chunk (gradient buckets)
    grad_sync_s: float            # DP gradient all-reduce / reduce-scatter of this chunk's grads
    activation_bytes: float       # activations held per in-flight micro-batch of this chunk


@dataclass(frozen=True)
class StageCost:
    """Everything one pipeline stage (one representative device) does in an iteration."""

    chunks: list[ChunkCost]       # v chunks; chunk c of stage s is virtual stage c*p + s
    optimizer_s: float            # optimizer step after gradients are synchronized
    param_sync_s: float = 0.0     # ZeRO-1/2: all-gather of updated parameters after the step


@dataclass(frozen=True)
class PipelineConfig:
    schedule: Schedule
    num_stages: int               # p
    num_microbatches: int         # m
    virtual_stages: int = 1       # v (interleaved only)
    p2p_s: float = 0.0            # one activation (or its gradient) between adjacent stages
    overlap_grad_reduce: bool = True


@dataclass
class TraceEvent:
    """One box on the timeline: Chrome trace 'X' event material."""

    stage: int                    # the pipeline stage (or serving replica)
    stream: str                   # "compute", "p2p", "dp"; serving adds "kv", "weights"
    name: str
    start_s: float
    end_s: float
    args: dict = field(default_factory=dict)


@dataclass
class StageTimeline:
    """What one stage did, summed over the iteration."""

    end_s: float                  # when this stage finished everything (incl. optimizer)
    compute_end_s: float          # end of its last backward
    busy_parts: dict[str, float]  # summed OpCost.parts over the ops it ran
    dp_exposed_s: float           # DP sync time after compute_end_s, before the optimizer
    optimizer_s: float
    param_sync_s: float
    peak_inflight_bytes: float    # largest sum of activation_bytes of in-flight micro-batches
    peak_inflight_microbatches: int


@dataclass
class PipelineResult:
    iteration_time_s: float
    stages: list[StageTimeline]
    events: list[TraceEvent]
