"""Training plan spec: parallel degrees, batching, schedule, memory options, per-stage overrides.

A plan is checked on its own here; checks that need the model or the cluster (TP divides the
heads, the degrees fill the cluster, stage layers sum to the model's) live in `validate_plan`.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, model_validator

from simulator.errors import SpecError
from simulator.specs.base import Spec
from simulator.specs.hardware import ClusterSpec
from simulator.specs.model import TransformerSpec

Fraction = Field(default=0.0, ge=0.0, le=1.0)
MAX_MICROBATCHES = 100_000
"""Micro-batches per pipeline per iteration: the pipeline engine runs each one as events, so
more would run for minutes (production runs use at most a few thousand)."""


class Offload(Spec):
    """Fractions of each kind of state kept in host memory instead of device memory."""

    kind: ClassVar[str] = "plan.offload"
    weights: float = Fraction
    gradients: float = Fraction
    optimizer: float = Fraction
    activations: float = Fraction

    @property
    def any(self) -> bool:
        return any((self.weights, self.gradients, self.optimizer, self.activations))


class StagePlan(Spec):
    """Per pipeline stage overrides: layer count, checkpointed layers, ZeRO stage, offloading.

    Fields left out take the plan's global value.
    """

    kind: ClassVar[str] = "plan.stages[]"
    layers: int = Field(ge=1)
    checkpointed_layers: int | None = Field(default=None, ge=0)
    zero_stage: Literal[0, 1, 2, 3] | None = None
    offload: Offload | None = None

    @model_validator(mode="after")
    def _ckpt(self):
        if self.checkpointed_layers is not None and self.checkpointed_layers > self.layers:
            raise ValueError(f"checkpointed_layers: must be <= layers = {self.layers}")
        return self


def split_layers(num_layers: int, pp: int) -> list[int]:
    """Layers per stage when the plan does not say: as even as possible.

    Megatron requires divisibility; we give any remainder to the stages without the
    embedding or the LM head first (the middle ones), then the last, then the first.
    """
    base, extra = divmod(num_layers, pp)
    layers = [base] * pp
    order = [*range(1, pp - 1), pp - 1, 0] if pp > 1 else [0]
    for i in order[:extra]:
        layers[i] += 1
    return layers


class TrainingPlan(Spec):
    """How one training iteration runs. Field names follow DESIGN.md."""

    kind: ClassVar[str] = "plan"
    name: str | None = None
    tp: int = Field(default=1, ge=1)
    pp: int = Field(default=1, ge=1)
    dp: int = Field(default=1, ge=1)
    micro_batch_size: int = Field(default=1, ge=1)
    global_batch_size: int = Field(ge=1)
    seq_length: int | None = Field(default=None, ge=1, description="default: the model's")
    schedule: Literal["gpipe", "1f1b", "interleaved"] = "1f1b"
    virtual_stages: int = Field(default=1, ge=1)
    zero_stage: Literal[0, 1, 2, 3] = 0
    dp_shard: int | None = Field(
        default=None, ge=1,
        description="HSDP: ranks a ZeRO-3 shard group spans (default: all of dp); groups are replicated dp / dp_shard times",
    )
    reshard_after_forward: bool = Field(
        default=True, description="ZeRO-3: free gathered weights after forward (FSDP2 default); false keeps them for backward",
    )
    reshard_between_microbatches: bool = Field(
        default=True,
        description="ZeRO-3: gather and reduce-scatter every micro-batch; false gathers once per iteration and "
                    "accumulates unsharded gradients (FSDP2 without gradient sync between micro-batches)",
    )
    regather_for_recompute: bool = Field(
        default=False,
        description="ZeRO-3: the recompute forward of a checkpointed layer gathers its weights again "
                    "(DeepSpeed's module hooks); FSDP2 runs the recompute on its pre-backward gather",
    )
    precision: Literal["bf16", "fp8"] = Field(default="bf16", description="GEMM precision of the linear layers")
    fp8_all_gather: bool = Field(default=False, description="ZeRO-3 gathers linear weights in fp8 (needs precision fp8)")
    gradient_dtype: Literal["bf16", "fp16", "fp32"] = "bf16"
    sequence_parallel: bool = False
    recompute: Literal["none", "selective", "selective_op", "full"] = Field(
        default="none",
        description="selective: re-run the attention core (Megatron-LM, Korthikanti et al.); selective_op: "
                    "torchtitan's per-op policy (keep attention and every other matmul output, re-run the rest); "
                    "full: re-run whole layers",
    )
    checkpointed_layers: int | None = Field(
        default=None, ge=0, description="with full recompute: layers per stage (default all)"
    )
    offload: Offload = Offload()
    flash_attention: bool = True
    fused_elementwise: bool = Field(
        default=True,
        description="element-wise ops run as fused kernels (Megatron-LM's, or torch.compile); false: PyTorch eager",
    )
    overlap_grad_reduce: bool = True
    overlap_tp_comm: bool = False
    stages: list[StagePlan] | None = None

    @model_validator(mode="after")
    def _self_consistent(self):
        if self.global_batch_size % (self.micro_batch_size * self.dp):
            raise ValueError(
                "global_batch_size: must be a multiple of micro_batch_size x dp = "
                f"{self.micro_batch_size} x {self.dp} = {self.micro_batch_size * self.dp}"
            )
        if self.num_microbatches > MAX_MICROBATCHES:
            raise ValueError(
                f"global_batch_size: gives {self.num_microbatches:,} micro-batches per iteration "
                f"(global_batch_size / (micro_batch_size x dp)); the simulator runs each, at most "
                f"{MAX_MICROBATCHES:,}: raise micro_batch_size or dp")
        if self.schedule == "interleaved":
            if self.virtual_stages < 2:
                raise ValueError("virtual_stages: must be >= 2 with schedule 'interleaved'")
            if self.pp < 2:
                raise ValueError("pp: must be >= 2 with schedule 'interleaved'")
        elif self.virtual_stages != 1:
            raise ValueError(f"virtual_stages: must be 1 unless schedule is 'interleaved' (it is {self.schedule!r})")
        if self.dp_shard is not None and self.dp % self.dp_shard:
            raise ValueError(f"dp_shard: must divide dp = {self.dp}, not {self.dp_shard}")
        if self.dp_shard not in (None, self.dp) and self.zero_stage != 3:
            raise ValueError(f"dp_shard: HSDP needs zero_stage 3 (it is {self.zero_stage})")
        if self.fp8_all_gather and self.precision != "fp8":
            raise ValueError(f"fp8_all_gather: needs precision 'fp8' (it is {self.precision!r})")
        if self.sequence_parallel and self.tp == 1:
            raise ValueError("sequence_parallel: needs tp > 1")
        if self.stages is not None and len(self.stages) != self.pp:
            raise ValueError(f"stages: must list one entry per pipeline stage (pp = {self.pp}), not {len(self.stages)}")
        return self

    @property
    def num_microbatches(self) -> int:
        """Micro-batches per pipeline per iteration (gradient accumulation steps)."""
        return self.global_batch_size // (self.micro_batch_size * self.dp)

    @property
    def recomputes_selectively(self) -> bool:
        """Selective recompute of either kind: the attention core's activations are not kept."""
        return self.recompute in ("selective", "selective_op")

    @property
    def shard_degree(self) -> int:
        """Ranks that ZeRO shards model states over (dp unless HSDP says fewer)."""
        return self.dp_shard or self.dp

    @property
    def replicate_degree(self) -> int:
        """HSDP replicas: gradients are all-reduced across them."""
        return self.dp // self.shard_degree

    @property
    def num_devices(self) -> int:
        return self.tp * self.pp * self.dp

    def seq(self, model: TransformerSpec) -> int:
        return self.seq_length or model.seq_length

    def stage_layers(self, model: TransformerSpec) -> list[int]:
        """Transformer layers per pipeline stage (uniform unless `stages` says otherwise)."""
        if self.stages is not None:
            return [st.layers for st in self.stages]
        return split_layers(model.num_layers, self.pp)

    def stage_zero(self) -> list[int]:
        """ZeRO stage of every pipeline stage."""
        return [
            st.zero_stage if st.zero_stage is not None else self.zero_stage
            for st in (self.stages or [StagePlan(layers=1)] * self.pp)
        ]

    def stage_offload(self) -> list[Offload]:
        """Offload fractions of every pipeline stage."""
        return [st.offload or self.offload for st in (self.stages or [StagePlan(layers=1)] * self.pp)]

    def stage_checkpointed(self, model: TransformerSpec) -> list[int]:
        """Checkpointed (fully recomputed) layers per stage."""
        layers = self.stage_layers(model)
        out = []
        for i, n in enumerate(layers):
            if self.stages is not None and self.stages[i].checkpointed_layers is not None:
                out.append(self.stages[i].checkpointed_layers)
            elif self.recompute == "full":
                out.append(n if self.checkpointed_layers is None else min(self.checkpointed_layers, n))
            else:
                out.append(0)
        return out


def validate_plan(plan: TrainingPlan, model: TransformerSpec, cluster: ClusterSpec) -> None:
    """Checks that need the model and the cluster. Raises SpecError naming the field."""
    heads = model.num_attention_heads
    if heads % plan.tp:
        raise SpecError("plan.tp", plan.tp, f"must divide num_attention_heads = {heads} of {model.name}")
    kv = model.num_kv_heads
    if kv % plan.tp and plan.tp % kv:
        raise SpecError("plan.tp", plan.tp, f"must divide or be a multiple of num_kv_heads = {kv}")
    if model.ffn_hidden_size % plan.tp:
        raise SpecError("plan.tp", plan.tp, f"must divide ffn_hidden_size = {model.ffn_hidden_size}")
    if plan.pp > model.num_layers:
        raise SpecError("plan.pp", plan.pp, f"must be <= num_layers = {model.num_layers} of {model.name}")
    if not cluster.host_offload:
        for o in plan.stage_offload():
            moved = {k: v for k, v in o.model_dump().items() if v}
            if moved:
                raise SpecError("plan.offload", moved, f"{cluster.name} has no separate host memory to offload to "
                                "(its devices are CPU ranks); all fractions must be 0")
    if plan.schedule == "interleaved" and plan.pp * plan.virtual_stages > model.num_layers:
        raise SpecError(
            "plan.virtual_stages", plan.virtual_stages,
            f"pp x virtual_stages must be <= num_layers = {model.num_layers}",
        )
    if plan.num_devices != cluster.num_devices:
        raise SpecError(
            "plan", f"tp={plan.tp} pp={plan.pp} dp={plan.dp}",
            f"tp x pp x dp = {plan.num_devices} must equal the {cluster.num_devices} devices of {cluster.name}",
        )
    layers = plan.stage_layers(model)
    if sum(layers) != model.num_layers:
        raise SpecError("plan.stages", layers, f"layers must sum to num_layers = {model.num_layers}")
    if plan.schedule == "interleaved":
        v = plan.virtual_stages
        bad = [n for n in layers if n < v]
        if bad:
            raise SpecError("plan.stages", layers, f"each stage needs >= virtual_stages = {v} layers")
        if plan.num_microbatches % plan.pp:
            raise SpecError(
                "plan.global_batch_size", plan.global_batch_size,
                f"interleaved 1F1B needs micro-batches ({plan.num_microbatches}) divisible by pp = {plan.pp}",
            )
