"""Continuous batching for the speculative loop: a finished request's row takes the next one.

`speculative.generate` runs one static batch until its last request stops, so the batch
shrinks and its slowest request sets the pace at the end. A serving engine instead refills
a finished row from the queue at once; then the batch stays full, and every batch slot
commits, step after step, what its current request accepts. That steady state is what the
cost model's k*(b) describes, and `steady_tokens_per_s` measures it: the committed tokens
over the rounds that ran with every row busy.

Prompts are prefilled once into a `PromptBank` (one row per prompt); admitting a request
copies its K/V row into the live cache, so runs that compare policies share one prefill and
no prefill time falls inside the decode rounds.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from executor.serving.drafts import Drafter
from executor.serving.model import KVCache, LlamaDecoder
from executor.serving.speculative import Policy, RequestStats, _extend


@dataclass
class PromptBank:
    """Every prompt prefilled once: its K/V row, length and greedy first token."""

    prompts: list[list[int]]
    cache: KVCache
    first: list[int]
    prefill_s: float

    @classmethod
    def build(cls, decoder: LlamaDecoder, prompts: Sequence[Sequence[int]]) -> PromptBank:
        if not prompts:
            raise ValueError("prompts: got 0 prompts; need at least 1")
        prompts = [list(map(int, p)) for p in prompts]
        cache = decoder.new_cache(len(prompts), max(len(p) for p in prompts) + 1)
        t0 = time.perf_counter()
        first = decoder.prefill(prompts, cache).tolist()
        return cls(prompts, cache, first, time.perf_counter() - t0)


@dataclass
class Round:
    batch_size: int
    k: int
    seconds: float
    tokens: int            # output tokens committed this round (after max_new_tokens cuts)
    full: bool             # every row busy and requests still waiting: steady state


@dataclass
class ContinuousResult:
    requests: list[RequestStats]
    rounds: list[Round] = field(default_factory=list)
    admit_s: float = 0.0

    def steady_tokens_per_s(self) -> float:
        """Committed tokens per second over the rounds that ran with the batch full."""
        full = [r for r in self.rounds if r.full]
        seconds = sum(r.seconds for r in full)
        return sum(r.tokens for r in full) / seconds if seconds > 0 else float("nan")

    def steady_rounds(self) -> int:
        return sum(r.full for r in self.rounds)

    def output_tokens_per_s(self) -> float:
        """Over the whole run, the draining tail included."""
        seconds = sum(r.seconds for r in self.rounds)
        return sum(r.tokens for r in self.rounds) / seconds if seconds > 0 else float("nan")

    def acceptance_rate(self) -> float | None:
        acc = sum(r.accepted for r in self.requests)
        seen = acc + sum(r.rejections for r in self.requests)
        return acc / seen if seen else None


def serve(decoder: LlamaDecoder, bank: PromptBank, order: Sequence[int], batch_size: int,
          drafter: Drafter | None, k_for: Policy, max_new_tokens: int = 64, max_k: int = 8,
          eos_id: int | None = None) -> ContinuousResult:
    """Serve the requests `order` (indices into the bank) with at most `batch_size` live rows,
    refilling each finished row from the queue, until every request has stopped."""
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r}: must be an integer >= 1")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens!r}: must be an integer >= 1")
    if not order:
        raise ValueError("order: no requests to serve; give at least one prompt index")
    eos_id = decoder.cfg.eos_id if eos_id is None else eos_id
    longest = max(len(bank.prompts[i]) for i in order)
    cache = decoder.new_cache(batch_size, longest + max_new_tokens + max_k + 1)
    queue = deque(enumerate(order))           # (request id, prompt index)
    reqs = [RequestStats(prompt_tokens=len(bank.prompts[p])) for p in order]
    contexts: dict[int, list[int]] = {}
    rows: list[int | None] = [None] * batch_size   # request id held by each row
    result = ContinuousResult(reqs)

    def admit(row: int) -> None:
        """Put the next waiting request that does not stop at its first token into `row`."""
        t0 = time.perf_counter()
        rows[row] = None
        while queue and rows[row] is None:
            rid, p = queue.popleft()
            n = len(bank.prompts[p])
            for dst, src in zip((*cache.k, *cache.v), (*bank.cache.k, *bank.cache.v)):
                dst[row, :, :n] = src[p, :, :n]
            cache.lengths[row] = n
            contexts[rid] = bank.prompts[p] + [bank.first[p]]
            if not _extend(reqs[rid], [bank.first[p]], max_new_tokens, eos_id):
                rows[row] = rid
        result.admit_s += time.perf_counter() - t0

    for row in range(batch_size):
        admit(row)
    while any(r is not None for r in rows):
        live = [i for i, r in enumerate(rows) if r is not None]
        if len(live) < cache.batch_size:  # draining: keep the live rows a prefix
            order_ = cache.compact(live)
            rows = [rows[o] for o in order_]
            live = list(range(len(rows)))
        b, full = len(live), bool(queue) and len(live) == batch_size
        k = k_for(b)
        if not isinstance(k, int) or not 0 <= k <= max_k:
            raise ValueError(f"k_for({b}) returned k={k!r}; allowed: an integer in 0..{max_k}")
        if k > 0 and drafter is None:
            raise ValueError(f"k_for({b}) returned k={k} but no drafter was given (k > 0 needs one)")
        t0 = time.perf_counter()
        ctx = [contexts[rows[i]] for i in live]
        pending = torch.tensor([c[-1] for c in ctx], dtype=torch.long)[:, None]
        drafts = drafter.propose(ctx, cache, k) if k else pending[:, :0]
        best = decoder.forward(torch.cat([pending, drafts], dim=1), cache).argmax(-1)
        m = (drafts == best[:, :k]).long().cumprod(dim=1).sum(dim=1)
        nxt = best.gather(1, m[:, None])[:, 0]
        cache.lengths[:b] += m + 1
        seconds = time.perf_counter() - t0
        m_list, d_list, n_list = m.tolist(), drafts.tolist(), nxt.tolist()
        committed, finished = 0, []
        for row in live:
            rid, mr = rows[row], m_list[row]
            req = reqs[rid]
            req.rounds += 1
            if k:
                req.drafted += k
                req.accepted += mr
                req.rejections += mr < k
            before = len(req.output)
            new = d_list[row][:mr] + [n_list[row]]
            contexts[rid].extend(new)
            done = _extend(req, new, max_new_tokens, eos_id)
            committed += len(req.output) - before
            if done:
                finished.append(row)
        result.rounds.append(Round(b, k, seconds, committed, full))
        for row in finished:
            admit(row)  # a refilled row starts its new request; an empty queue leaves it None
    return result
