"""Static-layout schedulers: what one engine step runs.

- `vllm`: prefill priority (vLLM's default scheduler before chunked prefill): whenever
  requests wait and fit, a step prefills them (up to max_batched_tokens and max_num_seqs);
  otherwise every running sequence decodes one token. When a decode needs a KV block and
  none is free, the most recently admitted sequence is preempted: by recompute (its blocks
  are freed and it rejoins the queue front) or by swap (its blocks move to the CPU pool).
- `sarathi`: chunked prefill with decode priority (Sarathi-Serve, Agrawal et al. OSDI'24):
  every step decodes all running sequences and fills the rest of a `chunk_size` token budget
  with prompt chunks, so prefills never stall decodes.
A step is planned (`plan`), costed by the caller, then committed (`commit`) at its end time.
With pipeline parallelism the replica runs pp micro-batches per step, each scheduled with
its own budget as vLLM's virtual engines are: max_batched_tokens and max_num_seqs scale
by pp (chunk_size too).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING

from simulator.serving.iteration import Work
from simulator.serving.kv_cache import BlockManager
from simulator.serving.sequence import Seq
from simulator.specs.serving import DeploymentSpec

if TYPE_CHECKING:
    from simulator.speculation import Speculator


@dataclass
class Step:
    kind: str                    # "prefill", "decode" or "mixed"
    seqs: list[Seq]
    works: list[Work]
    chunks: list[int]            # new tokens per sequence (parallel to seqs)
    k: int = 0                   # drafted tokens per sequence (speculative decode steps)


class StaticScheduler:
    def __init__(self, deployment: DeploymentSpec, kv: BlockManager, speculator: Speculator | None = None):
        self.dep, self.kv, self.speculator = deployment, kv, speculator
        pp = deployment.prefill.pp  # static layouts: prefill == decode
        self.max_seqs = deployment.max_num_seqs * pp
        self.max_tokens = deployment.max_batched_tokens * pp
        self.chunk = deployment.chunk_size * pp
        self.waiting: deque[Seq] = deque()
        self.running: list[Seq] = []
        self.swapped: deque[Seq] = deque()
        self.prefilling: list[Seq] = []   # sarathi: prompts part-way through
        self.preemptions = 0
        self.cached_tokens = 0            # prompt tokens taken from the prefix cache, not computed
        self.swapped_tokens = 0           # KV tokens moved over PCIe by swaps since last asked

    @property
    def idle(self) -> bool:
        return not (self.waiting or self.running or self.swapped or self.prefilling)

    def add(self, seq: Seq) -> None:
        self.waiting.append(seq)

    # --- planning -----------------------------------------------------------------------------
    def plan(self) -> Step | None:
        self._swap_in()
        if self.dep.scheduler == "sarathi":
            return self._plan_chunked()
        step = self._plan_prefill()
        return step if step else self._plan_decode()

    def _swap_in(self) -> None:
        while self.swapped and self.kv.can_swap_in(self.swapped[0].id):
            seq = self.swapped.popleft()
            self.kv.swap_in(seq.id)
            self.swapped_tokens += self.kv.tokens(seq.id)
            self.running.append(seq)

    def _admit(self, budget: int) -> list[tuple[Seq, int]]:
        """Waiting sequences that fit: (seq, tokens to compute now), within `budget` tokens.
        With prefix caching, a prompt's cached blocks are not computed again: it starts
        prefilled that far (`seq.prefilled`), at least its last token left to compute."""
        out, seats = [], self.max_seqs - len(self.running) - len(self.prefilling)
        caching = self.kv.prefix_caching
        while self.waiting and seats > len(out):
            seq = self.waiting[0]
            keys, cached = None, 0
            if caching:
                if seq.keys is None:
                    seq.keys = seq.block_keys(self.kv.block_size)
                keys = seq.keys
                cached = self.kv.cached_prefix(keys, seq.prompt_len - 1)
            left = seq.prompt_len - cached
            take = left if self.dep.scheduler == "vllm" else min(left, budget)
            if take <= 0 or (take > budget and out):
                break
            if not self.kv.can_allocate(seq.id, cached + take, keys, cached):
                break
            self.kv.allocate(seq.id, cached + take, keys, cached)
            seq.prefilled = cached
            self.cached_tokens += cached
            self.waiting.popleft()
            out.append((seq, take))
            budget -= take
        return out

    def _plan_prefill(self) -> Step | None:
        admitted = self._admit(self.max_tokens)
        if not admitted:
            return None
        seqs = [s for s, _ in admitted]
        chunks = [n for _, n in admitted]
        works = [Work(n, s.prefilled, True) for s, n in admitted]
        return Step("prefill", seqs, works, chunks)

    def _make_room(self, need_seqs: list[Seq], grow: int = 1) -> list[Seq]:
        """Preempt the newest running sequences until every survivor can grow by `grow` tokens,
        and reserve those KV slots (as vLLM does when it schedules a step; a speculative step
        writes k + 1 tokens per sequence)."""
        survivors = list(need_seqs)
        needed = sum(self.kv.growth(s.id, grow) for s in survivors)
        while survivors and needed > self.kv.num_free_gpu_blocks:
            victim = survivors.pop()
            needed -= self.kv.growth(victim.id, grow)
            self.running.remove(victim)
            self._preempt(victim)
        for seq in survivors:  # reserve the slots of the tokens this decode step writes
            self.kv.append(seq.id, grow)
        return survivors

    def _preempt(self, seq: Seq) -> None:
        self.preemptions += 1
        seq.preemptions += 1
        if self.dep.preemption == "swap" and self.kv.can_swap_out(seq.id):
            self.kv.swap_out(seq.id)
            self.swapped_tokens += self.kv.tokens(seq.id)
            self.swapped.append(seq)
        else:
            self.kv.free(seq.id)
            seq.prefilled, seq.decoding = 0, False
            self.waiting.appendleft(seq)

    def _plan_decode(self) -> Step | None:
        k = self.speculator.k_for(self.running) if self.speculator and self.running else 0
        seqs = self._make_room(list(self.running), k + 1)
        if not seqs:
            return None
        return Step("decode", seqs, [Work(k + 1, s.context, k + 1) for s in seqs], [k + 1] * len(seqs), k)

    def _plan_chunked(self) -> Step | None:
        decodes = self._make_room(list(self.running))
        budget = max(0, self.chunk - len(decodes))
        seqs, works, chunks = list(decodes), [Work(1, s.context, True) for s in decodes], [1] * len(decodes)
        for seq in list(self.prefilling):  # continue prompts already started
            take = min(seq.prompt_len - seq.prefilled, budget)
            if take <= 0 or not self.kv.can_append(seq.id, take):
                continue
            self.kv.append(seq.id, take)
            seqs.append(seq), chunks.append(take)
            works.append(Work(take, seq.prefilled, seq.prefilled + take == seq.prompt_len))
            budget -= take
        for seq, take in self._admit(budget):
            self.prefilling.append(seq)
            seqs.append(seq), chunks.append(take)
            works.append(Work(take, seq.prefilled, seq.prefilled + take == seq.prompt_len))
        if not seqs:
            return None
        return Step("mixed" if decodes and len(seqs) > len(decodes) else ("decode" if decodes else "prefill"),
                    seqs, works, chunks)

    def _commit_prompt(self, seq: Seq, chunk: int, now: float) -> bool:
        """Cache a prompt chunk; when it completes the prompt, the sequence emits its first
        token and starts decoding (unless that token was its last). Whether it completed."""
        seq.prefilled += chunk
        if seq.keys is not None:
            self.kv.cache_blocks(seq.id, seq.prefilled)
        if seq.prefilled < seq.prompt_len:
            return False
        if seq in self.prefilling:
            self.prefilling.remove(seq)
        seq.decoding = True
        seq.emit(now)
        if not seq.done:
            self.running.append(seq)
        return True

    def take_swapped_tokens(self) -> int:
        moved, self.swapped_tokens = self.swapped_tokens, 0
        return moved

    # --- committing ---------------------------------------------------------------------------
    def commit(self, step: Step, now: float) -> list[Seq]:
        """Apply a finished step; return the sequences that completed."""
        finished = []
        if self.speculator and step.kind == "decode":
            self.speculator.record_step(step.k)
        for seq, chunk in zip(step.seqs, step.chunks):
            if seq.decoding and self.speculator and step.kind == "decode":
                # k + 1 slots were reserved; keep the committed tokens' (never past the output)
                tokens = min(self.speculator.committed(seq, step.k), seq.req.output_tokens - seq.generated)
                self.kv.truncate(seq.id, self.kv.tokens(seq.id) - (step.k + 1 - tokens))
                seq.emit(now, tokens)
            elif seq.decoding:
                seq.emit(now)
            elif not self._commit_prompt(seq, chunk, now):
                continue
            if seq.done:
                if seq in self.running:
                    self.running.remove(seq)
                self.kv.free(seq.id)
                finished.append(seq)
        return finished
