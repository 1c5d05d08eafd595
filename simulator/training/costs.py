"""From (model, plan, cluster) to the engine's per-op costs and every stage's memory.

A thin layer over `stage_model.StageModel`, which holds the cost rules: it fills the
options of each stage from the plan (per-stage ZeRO, offload and checkpointing overrides
included) and packages the results as `StageCost` for the discrete-event engine.
"""

from __future__ import annotations

from dataclasses import dataclass

from simulator.costs import comm
from simulator.costs.symbols import GRAD_BYTES
from simulator.engine.pipeline_api import ChunkCost, OpCost, StageCost
from simulator.specs.hardware import ClusterSpec
from simulator.specs.model import TransformerSpec
from simulator.specs.plan import Offload, TrainingPlan
from simulator.training.fsdp import plan_fsdp_options
from simulator.training.stage_model import StageModel

OP_PARTS = ("compute", "tp_comm", "recompute", "zero3_comm", "offload_stall")


@dataclass(frozen=True)
class StageMemory:
    """Peak memory of one stage's device, by kind (bytes)."""

    weights: float
    gradients: float
    optimizer: float
    activations: float
    other: float  # recompute buffer, logits, ZeRO-3 gather/reduce buffers

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.activations + self.other


def stage_options(plan: TrainingPlan, zero_stage: int, offload: Offload, checkpointed: int) -> dict[str, float]:
    """The option symbols of one stage (see `simulator.costs.symbols`)."""
    return {
        "sq": float(plan.sequence_parallel), "sel": float(plan.recomputes_selectively),
        "sop": float(plan.recompute == "selective_op"), "eg": float(not plan.fused_elementwise),
        "flash": float(plan.flash_attention), "gb": GRAD_BYTES[plan.gradient_dtype],
        "z1": float(zero_stage >= 1), "z2": float(zero_stage >= 2), "z3": float(zero_stage >= 3),
        "o_w": offload.weights, "o_g": offload.gradients, "o_o": offload.optimizer,
        "o_a": offload.activations, "k": float(checkpointed), **plan_fsdp_options(plan),
    }


class TrainingCostModel:
    """Per-stage costs of one plan."""

    def __init__(self, model: TransformerSpec, plan: TrainingPlan, cluster: ClusterSpec):
        self.model, self.plan, self.cluster = model, plan, cluster
        self.stage_model = StageModel(model, cluster, plan.tp, plan.dp, plan.micro_batch_size,
                                      plan.seq(model), plan.overlap_tp_comm, plan.dp_shard, plan.num_microbatches)
        self.layers = plan.stage_layers(model)
        self.checkpointed = plan.stage_checkpointed(model)
        self.zero, self.offload = plan.stage_zero(), plan.stage_offload()

    def chunk(self, stage: int, layers: int, checkpointed: int, first: bool, last: bool) -> dict[str, float]:
        opts = stage_options(self.plan, self.zero[stage], self.offload[stage], checkpointed)
        return {k: float(v) for k, v in self.stage_model.evaluate(opts, layers, first, last).items()}

    def stage_params(self, layers: int, first: bool, last: bool) -> float:
        """Parameters of a stage with `layers` layers, per tensor-parallel shard."""
        layer_params = float(self.stage_model.costs({}, float(layers))["stage_params"])
        return layer_params + self.stage_model.extra_params(first, last)

    def p2p_s(self) -> float:
        if self.plan.pp == 1:
            return 0.0
        c = self.stage_model.costs({"sq": float(self.plan.sequence_parallel)}, 1.0)
        return float(comm.p2p_s(c["pp_p2p_bytes"], self.stage_model.links.pp))

    def _chunks(self, stage: int) -> list[tuple[int, int, bool, bool]]:
        """(layers, checkpointed, first, last) of each chunk of a stage, split evenly over v."""
        v, n, k = self.plan.virtual_stages, self.layers[stage], self.checkpointed[stage]
        return [
            (n // v + (c < n % v), k // v + (c < k % v),
             stage == 0 and c == 0, stage == self.plan.pp - 1 and c == v - 1)
            for c in range(v)
        ]

    def build_stages(self) -> list[StageCost]:
        """StageCost for every pipeline stage."""
        stages = []
        for i in range(self.plan.pp):
            chunks, optimizer, param_sync = [], 0.0, 0.0
            for layers, ckpt, first, last in self._chunks(i):
                c = self.chunk(i, layers, ckpt, first, last)
                fwd = OpCost({p: c[f"fwd_{p}"] for p in OP_PARTS if f"fwd_{p}" in c})
                bwd = OpCost({p: c[f"bwd_{p}"] for p in OP_PARTS if f"bwd_{p}" in c})
                chunks.append(ChunkCost(fwd, bwd, layers, c["grad_sync_s"], c["activation_bytes"]))
                optimizer += c["optimizer_s"]
                param_sync += c["param_sync_s"]
            stages.append(StageCost(chunks, optimizer, param_sync))
        return stages

    def host_memory(self, stage: int, inflight_microbatches: float) -> float:
        """Host memory holding what the stage offloads (states and in-flight activations)."""
        parts = [self.chunk(stage, *chunk) for chunk in self._chunks(stage)]
        per_mb = sum(p["host_activation_bytes"] for p in parts) / len(parts)
        return sum(p["host_states"] for p in parts) + inflight_microbatches * per_mb

    def stage_memory(self, stage: int, inflight_activation_bytes: float) -> StageMemory:
        """Peak memory of a stage given the engine's peak of in-flight activations."""
        parts = [self.chunk(stage, *chunk) for chunk in self._chunks(stage)]
        total = {k: sum(p[k] for p in parts) for k in ("weights", "gradients", "optimizer", "logits")}
        other = max(p["recompute_buffer"] + p["zero3_buffer"] for p in parts) + total["logits"]
        return StageMemory(total["weights"], total["gradients"], total["optimizer"],
                           inflight_activation_bytes, other)
