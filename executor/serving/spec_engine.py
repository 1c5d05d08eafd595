"""Speculative decoding inside the serving engine: n-gram drafts, one verification forward,
acceptance, and the rollback of rejected KV slots.

```
StaticScheduler._plan_decode: k = Speculator.k_for(running)      (simulator's policy code)
                              reserves k + 1 KV slots per sequence
SpecDecoder.items:   per sequence, up to k prompt-lookup drafts -> Item [pending, d1 .. dk]
PagedRunner.forward: one ragged batch, logits of every verified position
SpecDecoder.accept:  the accepted prefix + one token of the target's own, through the
                     engine's stop checks; EngineSpeculator.committed reports the count
StaticScheduler.commit: emits those tokens, truncates the KV to the committed length
PagedKV.sync:        block tables shrink to the manager's counts (rejected slots freed)
```

The policy is the simulator's, imported: `Speculator` (simulator/speculation/model.py)
picks k for the running batch, `fixed` k, `adaptive` from the table k*(b) that
`policy_table` computes with the serving cost model (`ModelStepCost` of the served model on
a cluster whose profile prices the steps: `1xcpu`, measured on the CPU, unless the config
names another), or `goodput` (SmartSpec: the k maximizing the expected committed tokens per
second of this batch, from each sequence's own acceptance record). The shared
`StaticScheduler` already plans speculative decode steps for the simulator (k + 1 slots
reserved, truncated at commit); the one thing that differs here is where the number of
accepted tokens comes from: the simulator draws it, the engine measures it. So
`EngineSpeculator` overrides only `committed`, which returns what verification accepted.

Per sequence, the step's k is cut to what can still be used: no more drafts than the
output tokens left minus one (the target always adds one), and none when the context has no
earlier n-gram match (a draft that cannot match only costs compute), so a sequence may
verify fewer than k drafts or decode one token as usual in a speculative step.

Acceptance:
- greedy requests (temperature 0): draft j is accepted while it equals the target's argmax
  at the position before it; the output is the engine's greedy output without speculation,
  token for token (up to floating-point near-ties: a verification item attends through the
  per-sequence path, a plain decode through the batched one);
- sampled requests: standard speculative sampling (Leviathan et al., arXiv 2211.17192) with
  the drafter's distribution a point mass on the drafted token: accept d with probability
  p(d) under the request's nucleus distribution, on rejection draw from p with d removed
  (renormalized), and after k acceptances draw the bonus token from p. The output follows the
  target's distribution, but not the same draws as without speculation (the generator is
  consumed differently), so a seeded request's text changes when speculation is switched on.
EOS, stop strings and max tokens are applied token by token over the accepted tokens, so a
request ends exactly where it would one token at a time.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

from executor.serving.drafts import NgramDrafter
from executor.serving.runner import Item
from executor.serving.sampling import SamplingParams, nucleus_probs
from simulator.errors import SpecError
from simulator.serving.schedulers import Step
from simulator.specs.serving import Parallel, SpeculationSpec
from simulator.speculation import NGRAM, ModelStepCost, Speculator

if TYPE_CHECKING:
    from executor.serving.engine import Engine, EngineConfig, EngineSeq


def check_speculation(config: EngineConfig) -> SpeculationSpec:
    """The config's speculation, or SpecError naming the field the engine cannot run with it."""
    spec = config.speculation
    if config.tp * config.pp > 1:
        raise SpecError("deployment.speculation", spec.model_dump(),
                        f"speculative decoding in the serving engine runs on one rank (tp = pp = 1), "
                        f"not tp = {config.tp}, pp = {config.pp}")
    if config.scheduler != "vllm":
        raise SpecError("deployment.scheduler", config.scheduler,
                        "speculation needs the 'vllm' scheduler (decode-only steps)")
    if spec.draft != NGRAM:
        raise SpecError("deployment.speculation.draft", spec.draft,
                        f"the serving engine drafts with {NGRAM!r} (prompt lookup) only")
    if spec.draft_tp != 1:
        raise SpecError("deployment.speculation.draft_tp", spec.draft_tp, "n-gram drafts run no model: 1")
    return spec


def speculative_tokens(spec: SpeculationSpec) -> int:
    """Drafted tokens per sequence a step may reserve KV for (the most k can be)."""
    return spec.k if spec.policy == "fixed" else spec.k_max


class EngineSpeculator(Speculator):
    """The simulator's `Speculator` with measured acceptance: `SpecDecoder.accept` stores
    each sequence's outcome (drafted, accepted, tokens appended) before the scheduler's
    commit asks for it."""

    def committed(self, seq, k: int) -> int:
        drafted, accepted, tokens = getattr(seq, "spec_step", (0, 0, 1)) if k else (0, 0, 1)
        seq.spec_step = (0, 0, 1)
        seq.spec_accepted += accepted
        seq.spec_rejections += accepted < drafted
        self.drafted += drafted
        self.accepted += accepted
        self.rejections += accepted < drafted
        return tokens


def build_speculator(config: EngineConfig, model_name: str = "smollm2-135m") -> EngineSpeculator:
    """The policy of `config.speculation`, priced by the serving cost model on
    `config.speculation_cluster` (whose profile times the steps)."""
    from simulator.specs.catalog import load_cluster, load_model

    spec = config.speculation
    cost = ModelStepCost.build(load_model(model_name), load_cluster(config.speculation_cluster), Parallel(), spec)
    return EngineSpeculator(spec, cost, float(config.speculation_context), np.random.default_rng(config.seed),
                            config.max_num_seqs)


def verify_greedy(logits: torch.Tensor, drafts: Sequence[int]) -> tuple[int, list[int]]:
    """(accepted drafts m, the m drafts + the target's token after them) from logits
    [len(drafts) + 1, vocab] of the positions [pending, d1 .. dk]."""
    best = logits.argmax(-1).tolist()
    m = 0
    while m < len(drafts) and drafts[m] == best[m]:
        m += 1
    return m, list(drafts[:m]) + [best[m]]


def verify_sampled(logits: torch.Tensor, drafts: Sequence[int], params: SamplingParams,
                   generator: torch.Generator | None) -> tuple[int, list[int]]:
    """Speculative sampling with point-mass drafts (see the module docstring): each token
    committed is distributed as the target's nucleus distribution given what precedes it."""
    for j, d in enumerate(drafts):
        p = nucleus_probs(logits[j], params.temperature, params.top_p)
        if float(torch.rand((), generator=generator)) < float(p[d]):
            continue
        p[d] = 0.0   # the residual max(0, p - q) with q the point mass on d
        tok = int(torch.multinomial(p / p.sum(), 1, generator=generator))
        return j, list(drafts[:j]) + [tok]
    p = nucleus_probs(logits[len(drafts)], params.temperature, params.top_p)
    return len(drafts), list(drafts) + [int(torch.multinomial(p, 1, generator=generator))]


class SpecDecoder:
    """Drafts, builds the verification items and accepts for the engine's speculative steps."""

    def __init__(self, engine: Engine, max_n: int = 3):
        self.engine = engine
        self.spec = check_speculation(engine.config)
        self.drafter = NgramDrafter(max_n=max_n, min_n=1)
        self.speculator = build_speculator(engine.config)

    def items(self, plan: Step) -> list[Item]:
        """[pending, d1 .. dk_i] per sequence, k_i <= the step's k (see the module docstring)."""
        out = []
        for seq in plan.seqs:
            left = seq.params.max_tokens - len(seq.output_ids)
            k = min(plan.k, left - 1)
            drafts: list[int] = []
            if k > 0:
                context = seq.prompt_ids + seq.output_ids
                drafts, hit = self.drafter.continuation(context, k)
                drafts = drafts if hit else []
            seq.spec_drafts = drafts
            out.append(Item(seq.id, seq.output_ids[-1:] + drafts, seq.context - 1, True, bool(drafts)))
        return out

    def accept(self, seqs: list[EngineSeq], logits: torch.Tensor) -> int:
        """Verify every sequence's drafts against its rows of `logits` and append the committed
        tokens through the engine's stop checks; the tokens appended in all."""
        row, total = 0, 0
        for seq in seqs:
            drafts = seq.spec_drafts
            rows = logits[row:row + len(drafts) + 1]
            row += len(drafts) + 1
            if seq.params.greedy:
                m, tokens = verify_greedy(rows, drafts)
            else:
                m, tokens = verify_sampled(rows, drafts, seq.params, seq.generator)
            n = 0
            for tok in tokens:
                self.engine._accept(seq, tok)
                n += 1
                if seq.finish_reason is not None:
                    break
            seq.spec_step = (len(drafts), m, n)
            total += n
        return total

    def stats(self) -> dict:
        """The speculator's counters, plus accepted drafts per speculative step."""
        out = self.speculator.stats()
        steps = sum(n for k, n in self.speculator.k_histogram.items() if k)
        out["accepted_per_step"] = self.speculator.accepted / steps if steps else 0.0
        return out
