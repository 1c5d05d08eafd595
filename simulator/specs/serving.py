"""Serving specs: a deployment (how replicas are laid out and scheduled) and a workload.

A deployment is static when its prefill and decode layouts are equal; with different
(tp, pp) for the two phases it re-shards between them (Seesaw, Su et al., MLSys'25), which
needs the `seesaw` scheduler and a CPU KV buffer. Field names follow DESIGN.md.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from simulator.errors import SpecError
from simulator.specs.base import Spec
from simulator.specs.hardware import ClusterSpec
from simulator.specs.model import TransformerSpec

MAX_REQUESTS = 10_000_000


class Parallel(Spec):
    """Tensor and pipeline parallel degrees of one replica in one phase."""

    kind: ClassVar[str] = "deployment.layout"
    tp: int = Field(default=1, ge=1)
    pp: int = Field(default=1, ge=1)

    @property
    def devices(self) -> int:
        return self.tp * self.pp

    def describe(self) -> str:
        return f"tp{self.tp} pp{self.pp}"


class EngineSpec(Spec):
    """The serving engine's own costs, apart from the hardware's.

    An engine step spends CPU time the GPU waits for: scheduling, input preparation,
    sampling, detokenization, output processing. Engines differ by several milliseconds
    (vLLM before v0.6 left a 5-13 ms GPU bubble per decode step, vllm-project/vllm#6854;
    multi-step scheduling and CUDA graphs remove most of it), so this is a property of the
    engine and its version, not of the device. Without an engine, the device profile's
    `step_overhead_us` applies. How the parts add up: `simulator.serving.engine_overhead`.
    """

    kind: ClassVar[str] = "deployment.engine"
    name: str | None = None
    source: str | None = Field(default=None, description="where the figures come from")
    step_overhead_us: float = Field(ge=0, description="fixed CPU cost of one engine step")
    per_sequence_overhead_us: float = Field(default=0.0, ge=0, description="CPU cost per sequence in a step")
    per_context_token_overhead_us: float = Field(default=0.0, ge=0, description=(
        "CPU cost per token of context (prompt + generated) of each sequence in a step: engines "
        "that ship every sequence's token ids between processes on every step"))
    draft_step_overhead_us: float = Field(default=0.0, ge=0, description=(
        "speculative decoding: CPU cost of each draft step (an engine that runs every draft "
        "token as its own model call pays it k times per step)"))
    eager: bool = Field(default=False, description=(
        "element-wise ops run one kernel per op, as PyTorch eager runs them (simtune's own engine: "
        "RMS norms with float32 statistics, rope by slices, separate SwiGLU product); false: fused "
        "kernels, as vLLM's custom ops and compiled graphs run them"))
    pipeline_overlap: bool = Field(default=True, description=(
        "pipeline parallel: the micro-batches of consecutive steps overlap across stages (vLLM's "
        "virtual engines); false: every step fills and drains the pipeline (simtune's own engine, "
        "executor/serving), see simulator/serving/iteration.py"))


class AcceptanceSpec(Spec):
    """Per-token acceptance rate of drafted tokens, as a distribution across requests.

    `fixed`: every request accepts with probability `mean`; `beta`: each request draws its
    rate from Beta(mean * concentration, (1 - mean) * concentration); `empirical`: each
    request draws one of `values` (e.g. per-request rates measured on a real model).
    """

    kind: ClassVar[str] = "deployment.speculation.acceptance"
    distribution: Literal["fixed", "beta", "empirical"] = "fixed"
    mean: float | None = Field(default=None, gt=0, lt=1)
    concentration: float = Field(default=10.0, gt=0, description="beta: alpha + beta")
    values: list[float] | None = Field(default=None, min_length=1)

    @model_validator(mode="after")
    def _params(self):
        if self.distribution == "empirical":
            if not self.values:
                raise ValueError("values: required by distribution 'empirical'")
            bad = [v for v in self.values if not 0 < v < 1]
            if bad:
                raise ValueError(f"values: every rate must be in (0, 1), got {bad[0]!r}")
        elif self.mean is None:
            raise ValueError(f"mean: required by distribution {self.distribution!r}")
        return self

    @property
    def average(self) -> float:
        return float(sum(self.values) / len(self.values)) if self.distribution == "empirical" else self.mean


class SpeculationSpec(Spec):
    """Speculative decoding as a decode mode: a drafter, an acceptance model and a policy for k.

    `policy`: `fixed` drafts `k` tokens every step; `adaptive` looks k up in the table
    k*(batch size) the cost model predicts (Su et al., arXiv 2310.18813); `goodput` picks k
    per step to maximize expected committed tokens per second of the running batch
    (SmartSpec, arXiv 2406.14066), k = 0 allowed.
    """

    kind: ClassVar[str] = "deployment.speculation"
    draft: str = Field(description="a catalog model that shares the target's tokenizer, or 'ngram' (prompt lookup)")
    draft_tp: int = Field(default=1, ge=1, description="tensor parallel degree of the draft model")
    policy: Literal["fixed", "adaptive", "goodput"] = "adaptive"
    k: int = Field(default=4, ge=0, description="fixed: tokens drafted per step")
    k_max: int = Field(default=8, ge=0, le=32, description="adaptive, goodput: largest k considered")
    acceptance: AcceptanceSpec
    learn_acceptance: bool = Field(default=False, description=(
        "adaptive: rebuild the k*(b) table from the acceptance measured so far (all sequences' accepted "
        "drafts and rejections, with `acceptance` as the prior) whenever it moves more than 0.05 from the "
        "rate the table was built on; an engine learns what its prompts accept"))


class DeploymentSpec(Spec):
    kind: ClassVar[str] = "deployment"
    name: str | None = None
    dp: int = Field(default=1, ge=1, description="replicas behind a router")
    prefill: Parallel = Parallel()
    decode: Parallel | None = Field(default=None, description="default: same as prefill (static)")
    scheduler: Literal["vllm", "sarathi", "seesaw"] = "vllm"
    max_num_seqs: int = Field(default=256, ge=1)
    max_batched_tokens: int = Field(default=8192, ge=1)
    chunk_size: int = Field(default=512, ge=1, description="sarathi: prefill tokens per iteration")
    block_size: int = Field(default=16, ge=1, description="tokens per KV block")
    gpu_memory_utilization: float = Field(default=0.9, gt=0, le=1)
    cpu_kv_buffer_GB: float = Field(default=0.0, ge=0, description="seesaw: CPU KV buffer per replica")
    preemption: Literal["recompute", "swap"] = "recompute"
    prefix_caching: bool = Field(default=False, description="share the KV blocks of equal prompt prefixes "
                                                            "(vLLM's automatic prefix caching)")
    engine: EngineSpec | None = Field(default=None, description="catalog name or inline; default: the device's step overhead")
    speculation: SpeculationSpec | None = Field(default=None, description="speculative decoding (vllm scheduler)")

    @field_validator("engine", mode="before")
    @classmethod
    def _engine_by_name(cls, value):
        if isinstance(value, str):
            from simulator.specs.catalog import load_engine  # the catalog imports this module

            return load_engine(value)
        return value

    @model_validator(mode="after")
    def _phases(self):
        if self.decode is None:
            object.__setattr__(self, "decode", self.prefill)
        if self.prefill.devices != self.decode.devices:
            raise ValueError(
                f"decode: must use as many devices as prefill ({self.prefill.devices}), "
                f"not {self.decode.devices} ({self.decode.describe()})"
            )
        if self.resharding and self.scheduler != "seesaw":
            raise ValueError(f"scheduler: different prefill and decode layouts need 'seesaw', not {self.scheduler!r}")
        if self.scheduler == "seesaw" and self.cpu_kv_buffer_GB <= 0:
            raise ValueError("cpu_kv_buffer_GB: the seesaw scheduler needs a CPU KV buffer > 0")
        if self.speculation is not None and self.scheduler != "vllm":
            raise ValueError(f"speculation: needs the 'vllm' scheduler (decode-only steps), not {self.scheduler!r}")
        if self.prefix_caching and self.scheduler == "seesaw":
            raise ValueError("prefix_caching: not with the seesaw scheduler (its two layouts keep separate pools)")
        if self.preemption == "swap" and self.cpu_kv_buffer_GB <= 0:
            raise ValueError("cpu_kv_buffer_GB: swap preemption needs CPU swap space > 0 "
                             "(when it is full, a victim is preempted by recompute instead)")
        return self

    @property
    def resharding(self) -> bool:
        return self.prefill != self.decode

    @property
    def devices_per_replica(self) -> int:
        return self.prefill.devices

    @property
    def num_devices(self) -> int:
        return self.dp * self.devices_per_replica


class LengthDist(Spec):
    """Token lengths: fixed, uniform [min, max], or lognormal with a mean and sigma, clipped."""

    kind: ClassVar[str] = "workload.tokens"
    distribution: Literal["fixed", "uniform", "lognormal"] = "fixed"
    value: int | None = Field(default=None, ge=1)
    mean: float | None = Field(default=None, gt=0)
    sigma: float | None = Field(default=None, gt=0)
    min: int = Field(default=1, ge=1)
    max: int = Field(default=1_000_000, ge=1)

    @model_validator(mode="after")
    def _params(self):
        need = {"fixed": ("value",), "uniform": (), "lognormal": ("mean", "sigma")}[self.distribution]
        for name in need:
            if getattr(self, name) is None:
                raise ValueError(f"{name}: required by distribution {self.distribution!r}")
        if self.min > self.max:
            raise ValueError(f"min: must be <= max = {self.max}")
        return self


class Arrival(Spec):
    kind: ClassVar[str] = "workload.arrival"
    kind_: Literal["offline", "poisson"] = Field(default="offline", alias="kind")
    rate_per_s: float | None = Field(default=None, gt=0)

    @model_validator(mode="after")
    def _rate(self):
        if self.kind_ == "poisson" and self.rate_per_s is None:
            raise ValueError("rate_per_s: required for poisson arrivals")
        return self


class SharedPrefix(Spec):
    """Prompts that open alike (a system prompt, a few-shot header): each request's prompt is
    one of `groups` prefixes of `tokens` tokens, drawn uniformly (seeded), then its own
    `input_tokens`, so its prompt has `tokens` + input_tokens tokens."""

    kind: ClassVar[str] = "workload.shared_prefix"
    tokens: int = Field(ge=1, description="tokens of each shared prefix")
    groups: int = Field(default=1, ge=1, description="distinct prefixes")


class WorkloadSpec(Spec):
    """Requests to serve: synthetic (a preset or length distributions) or a trace file."""

    kind: ClassVar[str] = "workload"
    name: str | None = None
    num_requests: int = Field(default=1000, ge=1, le=MAX_REQUESTS,
                              description="the simulator draws and runs every request")
    arrival: Arrival = Arrival()
    preset: Literal["sharegpt-like", "arxiv-summarization-like"] | None = None
    input_tokens: LengthDist | None = None
    output_tokens: LengthDist | None = None
    trace: str | None = Field(default=None, description="CSV or JSONL: arrival_s, input_tokens, output_tokens")
    seed: int = Field(default=0, ge=0, description="of numpy's SeedSequence, which takes no negatives")
    shared_prefix: SharedPrefix | None = Field(default=None, description="prompts opening with shared prefixes "
                                                                         "(what prefix caching saves)")

    @model_validator(mode="after")
    def _source(self):
        sources = [self.trace is not None, self.preset is not None,
                   self.input_tokens is not None or self.output_tokens is not None]
        if sum(sources) != 1:
            raise ValueError("preset: give exactly one of preset, input_tokens/output_tokens, or trace")
        if sources[2] and (self.input_tokens is None or self.output_tokens is None):
            raise ValueError("output_tokens: input_tokens and output_tokens go together")
        return self


def validate_deployment(deployment: DeploymentSpec, model: TransformerSpec, cluster: ClusterSpec) -> None:
    """Checks that need the model and the cluster. Raises SpecError naming the field."""
    heads, kv, ffn = model.num_attention_heads, model.num_kv_heads, model.ffn_hidden_size
    for phase in ("prefill", "decode"):
        layout: Parallel = getattr(deployment, phase)
        tp, field = layout.tp, f"deployment.{phase}.tp"
        # tp <= kv: each device holds whole GQA groups, as evenly as they split (3 groups on
        # tp 2: 2 + 1; the step costs the largest shard, iteration.shard_degrees); tp > kv:
        # engines replicate K/V heads, evenly only, and split the query heads evenly
        if tp > kv and tp % kv:
            raise SpecError(field, tp, f"must be <= num_kv_heads = {kv} of {model.name} (whole GQA groups "
                                       f"per device, uneven allowed) or a multiple of it")
        if tp > kv and heads % tp:
            raise SpecError(field, tp, f"above num_kv_heads = {kv}, must divide num_attention_heads = "
                                       f"{heads} of {model.name}")
        if tp > ffn:
            raise SpecError(field, tp, f"must be <= ffn_hidden_size = {ffn} of {model.name}")
        if layout.pp > model.num_layers:
            raise SpecError(f"deployment.{phase}.pp", layout.pp,
                            f"must be <= num_layers = {model.num_layers} of {model.name}")
    if deployment.num_devices != cluster.num_devices:
        raise SpecError("deployment", f"dp={deployment.dp} x {deployment.devices_per_replica} devices",
                        f"must use the {cluster.num_devices} devices of {cluster.name}")
