"""What every launch writer shares: the file it returns, the approximations it records, the header.

A writer turns (model, cluster, plan) into the text of one engine's configuration. Engines
cannot express every plan feature (per-stage ZeRO, fractional offloading, ...); for each one a
writer records a sentence saying what the plan asked for and what it wrote instead, so a user
never runs an approximated plan believing it is the simulated one. The sentences go both in
the returned `LaunchFile` and, as comments, at the top of the file itself.

When pipeline stages disagree on a setting the engine can only set once, writers pick the most
memory-saving value (`Approximations.one_value` takes the max), so every stage that fit in the
simulation still fits.
"""

from __future__ import annotations

import textwrap
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from simulator.errors import SpecError
from simulator.specs.hardware import ClusterSpec
from simulator.specs.model import TransformerSpec
from simulator.specs.plan import TrainingPlan

OFFLOAD_KINDS = ("weights", "gradients", "optimizer", "activations")


class EngineRefusal(SpecError):
    """The engine cannot run this model or plan at all: nothing is written rather than a file
    that runs something else. The message names the engine, what it lacks, and what can run it."""

    def __init__(self, engine: str, reason: str):
        super().__init__("emit", engine, reason)


@dataclass(frozen=True)
class LaunchFile:
    """One file a writer produced: relative to the output folder until `emit` writes it."""

    engine: str
    path: Path
    text: str
    approximations: list[str] = field(default_factory=list)
    executable: bool = False


class Approximations:
    """Collects one human sentence per plan feature the engine cannot express."""

    def __init__(self, engine: str):
        self.engine = engine  # the engine's display name, e.g. "Megatron-LM"
        self.items: list[str] = []

    def add(self, sentence: str) -> None:
        if sentence not in self.items:
            self.items.append(sentence)

    def one_value(self, values: Sequence, what: str, wrote: str) -> object:
        """The max of per-stage `values`, noting it when the stages differ.

        `wrote` names what the file says, with `{value}` standing for the value used.
        """
        value = max(values)
        if len(set(values)) > 1:
            self.add(
                f"{self.engine} cannot give pipeline stages different {what} "
                f"({_listing(values)}); used the largest, {wrote.format(value=value)}"
            )
        return value

    def __bool__(self) -> bool:
        return bool(self.items)

    def __iter__(self):
        return iter(self.items)


def stage_offload(plan: TrainingPlan) -> dict[str, list[float]]:
    """Offload fraction of each kind of state, one value per pipeline stage."""
    per_stage = plan.stage_offload()
    return {kind: [getattr(o, kind) for o in per_stage] for kind in OFFLOAD_KINDS}


def plan_summary(plan: TrainingPlan, model: TransformerSpec) -> str:
    """One line: degrees, batching, schedule and memory options (deterministic)."""
    schedule = plan.schedule
    if plan.schedule == "interleaved":
        schedule += f" x{plan.virtual_stages}"
    parts = [
        f"tp {plan.tp}", f"pp {plan.pp}", f"dp {plan.dp}",
        f"micro-batch {plan.micro_batch_size}", f"global batch {plan.global_batch_size}",
        f"seq {plan.seq(model)}", f"schedule {schedule}", f"zero {plan.zero_stage}",
        f"recompute {plan.recompute}", f"{plan.gradient_dtype} gradients",
    ]
    if plan.sequence_parallel:
        parts.append("sequence parallel")
    if plan.offload.any:
        parts.append("offload " + " ".join(
            f"{k} {getattr(plan.offload, k):g}" for k in OFFLOAD_KINDS if getattr(plan.offload, k)
        ))
    if plan.stages is not None:
        parts.append(f"stage layers {_listing(plan.stage_layers(model))}")
        parts.append(f"checkpointed {_listing(plan.stage_checkpointed(model))}")
        if len(set(plan.stage_zero())) > 1:
            parts.append(f"stage zero {_listing(plan.stage_zero())}")
        if len(set(plan.stage_offload())) > 1:
            parts.append("per-stage offload")
    return ", ".join(parts)


def engine_names(engines: str | Iterable[str], allowed: Sequence[str]) -> list[str]:
    """The requested engines, once each in order; an unknown name is a SpecError on `emit`."""
    names = [engines] if isinstance(engines, str) else list(engines)
    for name in names:
        if name not in allowed:
            raise SpecError("emit", name, f"allowed: {', '.join(allowed)}")
    return list(dict.fromkeys(names))


def comment_block(title: str, model: TransformerSpec, cluster: ClusterSpec, subject: str, summary: str,
                  approx: Approximations | None, prefix: str = "# ") -> str:
    """The comment block every launch file opens with: what wrote it, for what `subject`
    ("plan" or "deployment", with its name and `summary`), and what it approximates."""
    lines = [
        f"simtune launch configuration for {title}",
        f"model {model.name}; cluster {cluster.name} "
        f"({cluster.num_nodes} node(s) x {cluster.devices_per_node} {cluster.device.name})",
        f"{subject}: {summary}",
    ]
    kind = subject.split()[0]
    if approx is not None:
        lines.append("")
        if approx:
            lines.append(f"Approximations ({kind} features {approx.engine} cannot express):")
            lines += [f"  - {s}" for s in approx]
        else:
            lines.append(f"Every {kind} feature is expressed exactly.")
    wrapped: list[str] = []
    for line in lines:
        indent = "    " if line.startswith("  - ") else "  "
        wrapped += textwrap.wrap(
            line, 96, subsequent_indent=indent, break_long_words=False, break_on_hyphens=False
        ) or [""]
    wrapped.append("")  # an empty comment line sets the header apart from what follows
    return "\n".join((prefix + w).rstrip() for w in wrapped) + "\n"


def header(title: str, model: TransformerSpec, cluster: ClusterSpec, plan: TrainingPlan,
           approx: Approximations | None, prefix: str = "# ") -> str:
    """`comment_block` for a training plan."""
    return comment_block(title, model, cluster, f"plan {plan.name or '(unnamed)'}",
                         plan_summary(plan, model), approx, prefix)


def _listing(values: Sequence) -> str:
    return "[" + ", ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in values) + "]"
