"""Speculative decoding with batching: expected tokens, the cost of a step, and the choice of k.

A speculative step at batch size b and speculation length k runs k draft steps for the b
sequences, then one target forward over b(k+1) tokens (the pending token and the k drafts
of every sequence), then commits for each sequence the accepted prefix plus one token of
the target's own. With per-token acceptance rate a (independent tokens, Leviathan et al.,
arXiv 2211.17192) a sequence commits E(a, k) = (1 - a^(k+1)) / (1 - a) tokens per step, so

    throughput(b, k) = b * E_b(k) / (k * T_draft(b) + T_target(b, k + 1)),

where E_b is what a batch slot commits per step: the harmonic mean of E(a_i, k) over
requests when continuous batching keeps the batch full (`steady_tokens_per_step`).

While the target is memory-bound, T_target(b, k+1) is close to T_target(b, 1): the k extra
tokens per sequence are nearly free and large k pays. Once b(k+1) passes the roofline ridge
the extra tokens cost their full compute and the best k falls, to 0 at large batches (Su et
al., arXiv 2310.18813). `policy_table` computes k*(b) from any step-cost model: the symbolic
serving model on a device profile (`ModelStepCost`) or steps measured on a real machine
(`measured.py`: `MeasuredStepCost`, read by `measured_step_cost` from a profile directory's decode table or
a speculative benchmark's JSON). `Speculator` makes speculation a decode mode of the serving simulator:
fixed k, the adaptive table k*(b), or SmartSpec's goodput-maximizing k per step (arXiv
2406.14066), with stochastic acceptance per sequence.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from simulator.errors import SpecError
from simulator.serving.iteration import IterationModel, Work
from simulator.specs.catalog import load_model
from simulator.specs.hardware import ClusterSpec
from simulator.specs.model import TransformerSpec
from simulator.specs.serving import (
    AcceptanceSpec,
    EngineSpec,
    Parallel,
    SpeculationSpec,
)

NGRAM = "ngram"  # prompt-lookup drafting: no draft model


# --- acceptance ---------------------------------------------------------------------------------


def _check_rate(a: Any, name: str = "acceptance") -> np.ndarray:
    arr = np.asarray(a, dtype=float)
    if not np.all((arr > 0) & (arr < 1)):
        bad = arr[~((arr > 0) & (arr < 1))].ravel()[0]
        raise ValueError(f"{name} = {bad!r}: must be in (0, 1)")
    return arr


def _check_k(k: int, name: str = "k") -> int:
    if int(k) != k or k < 0:
        raise ValueError(f"{name} = {k!r}: must be an integer >= 0")
    return int(k)


def expected_tokens(a: float | np.ndarray, k: int) -> float | np.ndarray:
    """Tokens one sequence commits per step: (1 - a^(k+1)) / (1 - a) (Leviathan et al., eq. 1)."""
    arr, k = _check_rate(a), _check_k(k)
    out = (1.0 - arr ** (k + 1)) / (1.0 - arr)
    return float(out) if out.ndim == 0 else out


def mean_expected_tokens(acceptance: AcceptanceSpec, k: int) -> float:
    """E over requests of E(a_i, k) = sum_{j<=k} E[a^j]; exact for every distribution."""
    k = _check_k(k)
    if acceptance.distribution == "fixed":
        return expected_tokens(acceptance.mean, k)
    if acceptance.distribution == "empirical":
        return float(np.mean(expected_tokens(np.asarray(acceptance.values), k)))
    alpha = acceptance.mean * acceptance.concentration
    beta = (1.0 - acceptance.mean) * acceptance.concentration
    moment, total = 1.0, 1.0  # E[a^0]
    for j in range(k):  # Beta moments: E[a^(j+1)] = E[a^j] (alpha + j) / (alpha + beta + j)
        moment *= (alpha + j) / (alpha + beta + j)
        total += moment
    return total


def steady_tokens_per_step(acceptance: AcceptanceSpec, k: int) -> float:
    """Tokens a batch slot commits per step in steady-state continuous batching: the harmonic
    mean over requests of E(a_i, k).

    A request of L tokens holds its slot for L / E(a_i, k) steps, so a slot that serves
    requests one after another commits L / mean_i(L / E_i) tokens per step. Requests that
    accept little stay longest, which is why the arithmetic mean of E over requests
    (`mean_expected_tokens`) overstates what a busy engine gains when acceptance varies.
    """
    k = _check_k(k)
    if acceptance.distribution == "fixed":
        return expected_tokens(acceptance.mean, k)
    if acceptance.distribution == "empirical":
        return float(1.0 / np.mean(1.0 / expected_tokens(np.asarray(acceptance.values), k)))
    # Beta: integrate 1 / E(a, k) against the density on a fine midpoint grid
    alpha = acceptance.mean * acceptance.concentration
    beta = (1.0 - acceptance.mean) * acceptance.concentration
    a = (np.arange(BETA_GRID) + 0.5) / BETA_GRID
    log_pdf = (alpha - 1) * np.log(a) + (beta - 1) * np.log1p(-a)
    w = np.exp(log_pdf - log_pdf.max())
    return float(w.sum() / np.sum(w / expected_tokens(a, k)))


BETA_GRID = 20_000


def sample_rates(acceptance: AcceptanceSpec, n: int, rng: np.random.Generator) -> np.ndarray:
    """One acceptance rate per request."""
    if acceptance.distribution == "fixed":
        return np.full(n, acceptance.mean)
    if acceptance.distribution == "empirical":
        return rng.choice(np.asarray(acceptance.values), size=n)
    alpha = acceptance.mean * acceptance.concentration
    rates = rng.beta(alpha, acceptance.concentration - alpha, size=n)
    return np.clip(rates, 1e-6, 1 - 1e-6)  # a draw of exactly 0 or 1 has no geometric law


def sample_accepted(rate: float, k: int, rng: np.random.Generator) -> int:
    """Drafted tokens accepted in one step: successes before the first rejection, at most k."""
    return min(k, int(rng.geometric(1.0 - rate)) - 1) if k else 0


# --- step cost ----------------------------------------------------------------------------------


class StepCost(Protocol):
    """Seconds of one target forward (b sequences, n tokens each) and of one draft step."""

    def target_s(self, batch: int, tokens_per_seq: int, context: float) -> float: ...

    def draft_s(self, batch: int, context: float) -> float: ...


def step_s(cost: StepCost, batch: int, k: int, context: float) -> float:
    """k draft steps, then verification of k + 1 tokens per sequence."""
    return k * cost.draft_s(batch, context) + cost.target_s(batch, k + 1, context)


class ModelStepCost:
    """Step costs from the serving iteration model of the target and of the draft."""

    def __init__(self, target: IterationModel, draft: IterationModel | None):
        self.target, self.draft = target, draft

    @classmethod
    def build(cls, model: TransformerSpec, cluster: ClusterSpec, layout: Parallel,
              speculation: SpeculationSpec, engine: EngineSpec | None = None) -> ModelStepCost:
        target = IterationModel(model, cluster, layout, engine)
        if speculation.draft == NGRAM:
            return cls(target, None)
        draft_model = draft_model_of(speculation, model, layout)
        # the draft's kernels, plus the engine's CPU cost per draft step (0 unless it says)
        draft_overhead = engine.draft_step_overhead_us if engine else 0.0
        return cls(target, IterationModel(draft_model, cluster, Parallel(tp=speculation.draft_tp),
                                          EngineSpec(step_overhead_us=draft_overhead)))

    def target_s(self, batch: int, tokens_per_seq: int, context: float) -> float:
        return self.target.step_s([Work(tokens_per_seq, int(context), tokens_per_seq)] * batch)

    def draft_s(self, batch: int, context: float) -> float:
        if self.draft is None:
            return 0.0
        return self.draft.step_s([Work(1, int(context), 1)] * batch)


# --- the choice of k ----------------------------------------------------------------------------


def throughput(cost: StepCost, acceptance: AcceptanceSpec, batch: int, k: int, context: float) -> float:
    """Committed tokens per second of a batch kept full (continuous batching) that speculates
    k tokens every step."""
    return batch * steady_tokens_per_step(acceptance, k) / step_s(cost, batch, k, context)


@dataclass(frozen=True)
class PolicyRow:
    batch_size: int
    k: int                        # k*(b)
    tokens_per_s: float           # with k*(b)
    speedup: float                # over no speculation (k = 0) at this batch size
    speedup_over_fixed: float     # over the best single k for every batch size
    tokens_per_s_by_k: tuple[float, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"batch_size": self.batch_size, "k": self.k, "speedup": self.speedup,
                "speedup_over_fixed": self.speedup_over_fixed, "tokens_per_s": self.tokens_per_s,
                "tokens_per_s_by_k": list(self.tokens_per_s_by_k)}


@dataclass(frozen=True)
class PolicyTable:
    """k*(b) with predicted throughputs; `best_fixed_k` maximizes the geometric-mean speedup."""

    rows: list[PolicyRow]
    best_fixed_k: int
    context: float
    k_max: int

    def k_for(self, batch: int) -> int:
        """k of the largest tabulated batch size <= batch (the smallest one below the table)."""
        sizes = [r.batch_size for r in self.rows]
        return self.rows[max(0, bisect.bisect_right(sizes, batch) - 1)].k

    def as_dict(self) -> dict[int, int]:
        return {r.batch_size: r.k for r in self.rows}

    def to_dict(self) -> dict[str, Any]:
        return {"policy": [r.to_dict() for r in self.rows], "best_fixed_k": self.best_fixed_k,
                "context": self.context, "k_max": self.k_max}

    def plot(self, ax=None, title: str | None = None):
        """Throughput of every fixed k against batch size, with k*(b) marked."""
        import matplotlib.pyplot as plt

        if ax is None:
            _, ax = plt.subplots(figsize=(7, 4))
        sizes = [r.batch_size for r in self.rows]
        base = np.array([r.tokens_per_s_by_k[0] for r in self.rows])
        cmap = plt.get_cmap("viridis", self.k_max + 1)
        for k in range(self.k_max + 1):
            ratio = np.array([r.tokens_per_s_by_k[k] for r in self.rows]) / base
            ax.plot(sizes, ratio, color=cmap(k), lw=1, label=f"k={k}")
        ax.plot(sizes, [r.speedup for r in self.rows], "k--", lw=2, label="adaptive k*(b)")
        for r in self.rows:
            ax.annotate(str(r.k), (r.batch_size, r.speedup), textcoords="offset points",
                        xytext=(0, 6), ha="center", fontsize=8)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch size")
        ax.set_ylabel("throughput / no speculation")
        ax.axhline(1.0, color="grey", lw=0.5)
        ax.legend(fontsize=7, ncol=2)
        ax.set_title(title or "predicted speedup by speculation length (numbers: k*)")
        return ax


def policy_table(cost: StepCost, acceptance: AcceptanceSpec, batch_sizes: Iterable[int],
                 k_max: int = 8, context: float = 512.0) -> PolicyTable:
    """k*(b) = argmax_k throughput(b, k) for every batch size, and the best fixed k."""
    k_max = _check_k(k_max, "k_max")
    sizes = sorted({int(b) for b in batch_sizes})
    if not sizes or sizes[0] < 1:
        raise ValueError(f"batch_sizes = {sizes}: need at least one batch size >= 1")
    grid = np.array([[throughput(cost, acceptance, b, k, context) for k in range(k_max + 1)] for b in sizes])
    speedups = grid / grid[:, :1]
    best_fixed = int(np.argmax(np.exp(np.log(speedups).mean(axis=0))))
    rows = []
    for b, tput in zip(sizes, grid):
        k = int(np.argmax(tput))
        rows.append(PolicyRow(b, k, float(tput[k]), float(tput[k] / tput[0]),
                              float(tput[k] / tput[best_fixed]), tuple(float(x) for x in tput)))
    return PolicyTable(rows, best_fixed, float(context), k_max)


def goodput_k(cost: StepCost, rates: Sequence[float], context: float, k_max: int) -> int:
    """SmartSpec: the k (0 allowed) maximizing sum_i E(a_i, k) / step time for this batch."""
    rates = np.asarray(rates, dtype=float)
    b = len(rates)
    best_k, best = 0, -1.0
    for k in range(k_max + 1):
        good = float(np.sum(expected_tokens(rates, k))) / step_s(cost, b, k, context)
        if good > best:
            best_k, best = k, good
    return best_k


# --- speculation inside the serving simulator ---------------------------------------------------


def draft_model_of(speculation: SpeculationSpec, target: TransformerSpec, layout: Parallel) -> TransformerSpec:
    """The draft model, checked against the target: same vocabulary, a legal draft_tp."""
    draft = load_model(speculation.draft)
    if draft.vocab_size != target.vocab_size:
        raise SpecError("deployment.speculation.draft", speculation.draft, (
            f"must share the target's tokenizer: vocab_size {draft.vocab_size} != {target.vocab_size} "
            f"of {target.name}"))
    tp = speculation.draft_tp
    if tp > layout.tp or draft.num_attention_heads % tp or draft.num_kv_heads % tp:
        raise SpecError("deployment.speculation.draft_tp", tp, (
            f"must divide the draft's heads ({draft.num_attention_heads}, kv {draft.num_kv_heads}) "
            f"and be <= the target's tp = {layout.tp}"))
    return draft


def acceptance_rate(accepted: int, rejections: int) -> float | None:
    """Per-token acceptance rate from counts: accepted / (accepted + rejections), the maximum
    likelihood estimate under independent acceptance (each step ends at its first rejection)."""
    return accepted / (accepted + rejections) if accepted + rejections else None


def shrunk_acceptance(accepted, rejections, prior: float, weight: float, bound: float):
    """`acceptance_rate` shrunk toward a prior mean worth `weight` drafts, clipped to
    [bound, 1 - bound] (scalars, or arrays of per-sequence counts)."""
    rate = (accepted + prior * weight) / (accepted + rejections + weight)
    return np.minimum(np.maximum(rate, bound), 1 - bound)


def max_batch_in_kv(model: TransformerSpec, cluster: ClusterSpec, deployment, context: float) -> int:
    """The largest batch whose KV (context + k_max drafts per sequence) fits one replica."""
    from simulator.serving.simulate import kv_capacity_tokens  # simulate imports this module

    it = IterationModel(model, cluster, deployment.decode, deployment.engine)
    capacity = kv_capacity_tokens(model, cluster, deployment, it, "deployment.decode")
    spec = deployment.speculation
    extra = (spec.k if spec.policy == "fixed" else spec.k_max) + 1 if spec else 1
    return int(capacity // (context + extra))


LEARN_PRIOR_DRAFTS = 20      # learn_acceptance: the weight of the spec's acceptance, in drafts
LEARN_TOLERANCE = 0.05       # learn_acceptance: how far the estimate moves before the table is rebuilt
TABLE_BATCH_SIZES = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024)


@dataclass
class Speculator:
    """Chooses k for a decode step, prices the draft steps, and samples what is accepted."""

    spec: SpeculationSpec
    cost: ModelStepCost
    context: float                     # representative context for the adaptive table
    rng: np.random.Generator
    max_batch: int
    table: PolicyTable | None = None
    steps: int = 0
    drafted: int = 0
    accepted: int = 0
    rejections: int = 0
    k_histogram: dict[int, int] = field(default_factory=dict)
    table_acceptance: float | None = None   # adaptive: the mean acceptance the table was built on
    tables_built: int = 0

    def __post_init__(self):
        if self.spec.policy == "adaptive":
            self._build_table(self.spec.acceptance)

    def _build_table(self, acceptance: AcceptanceSpec) -> None:
        sizes = [b for b in TABLE_BATCH_SIZES if b < self.max_batch] + [self.max_batch]
        self.table = policy_table(self.cost, acceptance, sizes, self.spec.k_max, self.context)
        self.table_acceptance = acceptance.average
        self.tables_built += 1

    def _relearn(self) -> None:
        """`learn_acceptance`: a new k*(b) table once the pooled acceptance estimate (the spec's
        acceptance as a prior worth `LEARN_PRIOR_DRAFTS` drafts) has moved more than
        `LEARN_TOLERANCE` from the rate of the table in use. Per drafted token the outcome is
        accepted or the first rejection, so accepted / (accepted + rejections) is the per-token
        rate's maximum-likelihood estimate (the model `sample_accepted` draws from)."""
        rate = float(shrunk_acceptance(self.accepted, self.rejections, self.spec.acceptance.average,
                                       LEARN_PRIOR_DRAFTS, 0.01))
        if abs(rate - self.table_acceptance) > LEARN_TOLERANCE:
            self._build_table(AcceptanceSpec(distribution="fixed", mean=rate))

    def k_for(self, seqs: Sequence) -> int:
        return self.k_for_batch(len(seqs), lambda: ([s.context for s in seqs], [s.spec_accepted for s in seqs],
                                                    [s.spec_rejections for s in seqs]))

    def k_for_batch(self, batch: int, records) -> int:
        """k for a batch of `batch` sequences; `records()` gives their contexts, accepted
        drafts and rejections (lists or int arrays), asked for only by the goodput policy."""
        if self.spec.policy == "fixed":
            return self.spec.k
        if self.spec.policy == "adaptive":
            if self.spec.learn_acceptance:
                self._relearn()
            return self.table.k_for(batch)
        contexts, accepted, rejections = (np.asarray(x) for x in records())
        context = float(np.mean(contexts))
        return goodput_k(self.cost, self._estimate(accepted, rejections), context, self.spec.k_max)

    def _estimate(self, accepted: np.ndarray, rejections: np.ndarray) -> np.ndarray:
        """Acceptance estimate of each sequence: its own record, starting from the prior mean
        with the weight of two observations (SmartSpec tracks a moving acceptance rate)."""
        return shrunk_acceptance(accepted, rejections, self.spec.acceptance.average, 2.0, 1e-3)

    def draft_s(self, works: list[Work], k: int) -> float:
        """k draft steps over the batch at its actual contexts."""
        if not k or self.cost.draft is None:
            return 0.0
        return k * self.cost.draft.step_s([Work(1, w.context, 1) for w in works])

    def committed(self, seq, k: int) -> int:
        """Tokens a sequence commits after verifying k drafts: accepted + the target's own."""
        m = sample_accepted(seq.acceptance, k, self.rng)
        seq.spec_accepted += m
        seq.spec_rejections += m < k
        self.drafted += k
        self.accepted += m
        self.rejections += m < k
        return m + 1

    def record_step(self, k: int, steps: int = 1) -> None:
        self.steps += steps
        self.k_histogram[k] = self.k_histogram.get(k, 0) + steps

    def record_draws(self, k: int, accepted: np.ndarray) -> None:
        """The counters `committed` keeps, for drafts of k tokens of which `accepted` were."""
        self.drafted += k * accepted.size
        self.accepted += int(accepted.sum())
        self.rejections += int((accepted < k).sum())

    def stats(self) -> dict[str, Any]:
        return {"policy": self.spec.policy, "draft": self.spec.draft, "decode_steps": self.steps,
                "drafted": self.drafted, "accepted": self.accepted, "rejections": self.rejections,
                "k_histogram": dict(sorted(self.k_histogram.items())),
                "mean_k": sum(k * n for k, n in self.k_histogram.items()) / max(self.steps, 1),
                "acceptance_rate": acceptance_rate(self.accepted, self.rejections),
                "table": self.table.as_dict() if self.table else None,
                "table_acceptance": self.table_acceptance, "tables_built": self.tables_built}
