"""The batched greedy speculative decoding loop, with per-round timing and acceptance stats.

State per live sequence: its context (prompt + output so far), `cache.lengths[i]` (tokens
whose K/V are cached), and the pending token t0 (the target's greedy next token, already
part of the output, not yet cached). One round with speculation length k:

1. the drafter proposes d1 .. dk for every live sequence (skipped when k = 0);
2. the target runs [t0, d1 .. dk] in ONE forward of k + 1 tokens per sequence, at positions
   lengths[i] .. lengths[i] + k, and takes the argmax a_0 .. a_k at every position;
3. d_j is accepted while d_j == a_{j-1}; with m accepted, t0, d1 .. dm are committed
   (lengths[i] += m + 1) and a_m (the correction, or the bonus token when m = k) becomes the
   next pending token. Rejected drafts' K/V stay in the cache beyond lengths[i], where the
   mask hides them until they are overwritten.

k = 0 is plain greedy decoding, one token per sequence per round. The output is exactly the
target's greedy output up to floating-point ties: the verification forward batches k + 1
positions, so its matmuls round differently from one-token steps, and a near-tie argmax can
in principle flip (tests and the benchmark check outputs against k = 0).

The round's k comes from a policy `k_for(live_batch_size) -> k`: `fixed_k(4)`, or
`table_policy({1: 6, 8: 3, 32: 1})` (the entry at or below the current batch size).
Sequences stop at EOS (kept in the output, as transformers' generate does) or at
max_new_tokens; finished ones leave the batch at the end of the round (`KVCache.compact`),
so the batch shrinks as requests finish and the policy sees the live batch size.

Acceptance per request: accepted / (accepted + rejections), where a rejection is a round
with m < k. Under the i.i.d. model of Leviathan et al. (ICML'23), each draft token is
accepted with probability alpha until the first rejection, and this ratio is the maximum
likelihood estimate of alpha (rounds that accept all k tokens are censored observations).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from executor.serving.drafts import Drafter
from executor.serving.model import KVCache, LlamaDecoder

Policy = Callable[[int], int]


def fixed_k(k: int) -> Policy:
    """The constant policy: speculation length k whatever the batch size."""
    if not isinstance(k, int) or k < 0:
        raise ValueError(f"k={k!r}: the speculation length must be an integer >= 0 (0 = plain decoding)")
    return lambda batch_size: k


def table_policy(table: Mapping[int, int]) -> Policy:
    """k from a table {batch size: k}: the entry at the largest batch size <= the live batch
    size (below the smallest entry, the smallest entry's k)."""
    if not table:
        raise ValueError("table={}: the policy table needs at least one batch size -> k entry")
    items = sorted((int(b), int(k)) for b, k in table.items())
    for b, k in items:
        if b < 1 or k < 0:
            raise ValueError(f"table entry {b}: {k}: batch sizes must be >= 1 and k >= 0")

    def k_for(batch_size: int) -> int:
        chosen = items[0][1]
        for b, k in items:
            if b <= batch_size:
                chosen = k
        return chosen

    return k_for


@dataclass
class RoundStats:
    batch_size: int
    k: int
    draft_s: float
    verify_s: float
    other_s: float                      # acceptance bookkeeping and dropping finished rows
    requests: list[int]                 # request index of each live row
    accepted: list[int]                 # m per live row

    @property
    def tokens(self) -> int:
        """Tokens the round determined (m + 1 per sequence, before any max_new_tokens cut)."""
        return sum(self.accepted) + self.batch_size


@dataclass
class RequestStats:
    prompt_tokens: int
    output: list[int] = field(default_factory=list)
    drafted: int = 0
    accepted: int = 0
    rejections: int = 0                 # rounds with m < k (k >= 1)
    rounds: int = 0
    stop: str = ""                      # "eos" or "length"

    @property
    def acceptance_rate(self) -> float | None:
        """MLE of the per-token acceptance probability (None without drafts)."""
        seen = self.accepted + self.rejections
        return self.accepted / seen if seen else None


@dataclass
class PrefillState:
    """The batch right after prefill: reusable (`clone`) so several runs share one prefill."""

    prompts: list[list[int]]
    cache: KVCache
    first: list[int]                    # each prompt's greedy next token
    max_new_tokens: int
    max_k: int
    prefill_s: float

    def clone(self) -> PrefillState:
        return PrefillState(self.prompts, self.cache.clone(), list(self.first), self.max_new_tokens,
                            self.max_k, self.prefill_s)


@dataclass
class SpecResult:
    requests: list[RequestStats]
    rounds: list[RoundStats]
    prefill_s: float
    decode_s: float                     # wall time of all rounds (prefill excluded)

    @property
    def outputs(self) -> list[list[int]]:
        return [r.output for r in self.requests]

    @property
    def decode_tokens(self) -> int:
        """Output tokens produced by the rounds (each request's first token came from prefill)."""
        return sum(max(0, len(r.output) - 1) for r in self.requests)

    @property
    def output_tokens_per_s(self) -> float:
        return self.decode_tokens / self.decode_s if self.decode_s > 0 else float("nan")

    @property
    def tokens_per_round(self) -> float:
        """Mean tokens determined per sequence per round (m + 1)."""
        seq_rounds = sum(r.batch_size for r in self.rounds)
        return sum(r.tokens for r in self.rounds) / seq_rounds if seq_rounds else float("nan")

    @property
    def acceptance_rate(self) -> float | None:
        """Pooled over requests: sum accepted / (sum accepted + sum rejections)."""
        acc = sum(r.accepted for r in self.requests)
        seen = acc + sum(r.rejections for r in self.requests)
        return acc / seen if seen else None


def _check_prompts(prompts: Sequence[Sequence[int]], max_new_tokens: int, max_k: int) -> None:
    if len(prompts) == 0:
        raise ValueError("prompts: got 0 prompts; need at least 1 (a non-empty list of token id lists)")
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"prompts[{i}] is empty; every prompt needs at least 1 token")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens!r}: must be an integer >= 1")
    if not isinstance(max_k, int) or max_k < 0:
        raise ValueError(f"max_k={max_k!r}: the largest speculation length must be an integer >= 0")


def prefill(decoder: LlamaDecoder, prompts: Sequence[Sequence[int]], max_new_tokens: int,
            max_k: int = 8) -> PrefillState:
    """Allocate a cache for the batch (room for max_new_tokens + max_k more positions) and
    prefill every prompt; the state is ready for `generate`."""
    _check_prompts(prompts, max_new_tokens, max_k)
    prompts = [list(map(int, p)) for p in prompts]
    max_len = max(len(p) for p in prompts) + max_new_tokens + max_k + 1
    cache = decoder.new_cache(len(prompts), max_len)
    t0 = time.perf_counter()
    first = decoder.prefill(prompts, cache).tolist()
    return PrefillState(prompts, cache, first, max_new_tokens, max_k, time.perf_counter() - t0)


def _extend(req: RequestStats, tokens: list[int], max_new_tokens: int, eos_id: int) -> bool:
    """Append tokens until EOS or the length limit; True when the request is finished."""
    for t in tokens:
        req.output.append(t)
        if t == eos_id:
            req.stop = "eos"
            return True
        if len(req.output) >= max_new_tokens:
            req.stop = "length"
            return True
    return False


def generate(decoder: LlamaDecoder, state: PrefillState, drafter: Drafter | None, k_for: Policy,
             eos_id: int | None = None) -> SpecResult:
    """Run rounds until every request stopped. Consumes `state` (its cache is overwritten)."""
    eos_id = decoder.cfg.eos_id if eos_id is None else eos_id
    cache, max_new = state.cache, state.max_new_tokens
    reqs = [RequestStats(prompt_tokens=len(p)) for p in state.prompts]
    contexts = [list(p) for p in state.prompts]
    live = []
    for i, (req, t) in enumerate(zip(reqs, state.first)):
        contexts[i].append(t)
        if not _extend(req, [t], max_new, eos_id):
            live.append(i)
    rounds: list[RoundStats] = []
    t_start = time.perf_counter()
    if len(live) < len(reqs):
        live = cache.compact(live)  # rows are still request indices here
    while live:
        b = len(live)
        k = k_for(b)
        if not isinstance(k, int) or not 0 <= k <= state.max_k:
            raise ValueError(f"k_for({b}) returned k={k!r}; allowed: an integer in 0..{state.max_k} "
                             "(max_k given to prefill)")
        if k > 0 and drafter is None:
            raise ValueError(f"k_for({b}) returned k={k} but no drafter was given (k > 0 needs one)")
        t0 = time.perf_counter()
        pending = torch.tensor([contexts[r][-1] for r in live], dtype=torch.long)[:, None]
        drafts = drafter.propose([contexts[r] for r in live], cache, k) if k else pending[:, :0]
        t1 = time.perf_counter()
        best = decoder.forward(torch.cat([pending, drafts], dim=1), cache).argmax(-1)   # [b, k+1]
        m = (drafts == best[:, :k]).long().cumprod(dim=1).sum(dim=1)
        nxt = best.gather(1, m[:, None])[:, 0]
        cache.lengths[:b] += m + 1
        t2 = time.perf_counter()
        m_list, d_list, n_list = m.tolist(), drafts.tolist(), nxt.tolist()
        keep = []
        for row, r in enumerate(live):
            req, mr = reqs[r], m_list[row]
            req.rounds += 1
            if k:
                req.drafted += k
                req.accepted += mr
                req.rejections += mr < k
            new = d_list[row][:mr] + [n_list[row]]
            contexts[r].extend(new)
            if not _extend(req, new, max_new, eos_id):
                keep.append(row)
        round_requests = list(live)
        if len(keep) < b:
            live = [live[j] for j in cache.compact(keep)]
        t3 = time.perf_counter()
        rounds.append(RoundStats(b, k, t1 - t0, t2 - t1, t3 - t2, round_requests, m_list))
    return SpecResult(reqs, rounds, state.prefill_s, time.perf_counter() - t_start)


def speculative_generate(decoder: LlamaDecoder, prompts: Sequence[Sequence[int]], drafter: Drafter | None = None,
                         k_for: Policy | int = 0, max_new_tokens: int = 64, max_k: int = 8,
                         eos_id: int | None = None) -> SpecResult:
    """Prefill and generate greedily; `k_for` is a policy or a fixed k (0 = plain decoding)."""
    policy = fixed_k(k_for) if isinstance(k_for, int) else k_for
    if isinstance(k_for, int) and k_for > max_k:
        raise ValueError(f"k={k_for}: larger than max_k={max_k}; raise max_k or lower k")
    return generate(decoder, prefill(decoder, prompts, max_new_tokens, max_k), drafter, policy, eos_id)
