"""The decoding sequences of one replica as arrays, and runs of identical decode steps.

Design note. Between two events the decode batch of a replica is the same set of sequences,
each gaining the same number of tokens per step (one, or a speculative step's committed
tokens), so the steps up to the next event can be computed at once instead of one simpy
event and one Python loop over the batch each:
- the next completion: a sequence reaching its output length ends the run (that step is
  its last);
- a KV block the pool cannot give: the step that would preempt is left to the scheduler;
  block boundaries that the pool can serve are counted, not stopped at (the growth of
  every step is a periodic function of the contexts modulo the block size);
- an arrival: every step after the first must end strictly before the next arrival, so
  that the scheduler plans the following step with the same waiting queue as step by step;
- a speculation policy that looks at per-sequence records (goodput) runs one step at a time;
  with random acceptance, a run draws a block of acceptances in the order the step-by-step
  path draws them (step by step, sequence by sequence, from the same generator), then
  rewinds the generator and draws again exactly what the steps it keeps used.
Step times come from `IterationModel.batch_step_s` on integer sums over the batch, which
give the same bits whether computed for one step or for an array of steps, and the clock
advances by the same floating-point additions, so the times are exactly those of the
step-by-step path.

`DecodeBatch` mirrors the block manager's blocks of its sequences exactly, but tells the
block manager about new tokens lazily: only when a sequence needs a new block (or is
swapped out), and always before a sequence leaves, so every block the pool gives still
goes through `BlockManager.append`.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import numpy as np
import simpy
from simpy.core import NORMAL

from simulator.serving.iteration import BatchSums, IterationModel
from simulator.serving.kv_cache import BlockManager
from simulator.serving.sequence import Seq

_INT = np.int64


def _field(i: int) -> property:
    """Row i of the batch's state, over its sequences."""
    def get(self) -> np.ndarray:
        return self._state[i, :self.n]

    def set_(self, value) -> None:
        self._state[i, :self.n] = value
    return property(get, set_)


class DecodeBatch:
    """Running (decoding) sequences of one replica, in the order they joined the batch.

    One int array per field, views into a single (fields x capacity) block so that joining
    and leaving the batch is one array operation, not one per field.
    """

    # id: the request's; ctx: context (input + generated tokens); end: the context at which the
    # sequence is done; blocks: KV blocks held (what the block manager holds); synced: KV tokens
    # the block manager was last told; accepted, rejected: speculative decoding's drafts
    # accepted so far and steps that rejected a draft
    id, ctx, end, blocks, synced, accepted, rejected = (_field(i) for i in range(7))

    def __init__(self, kv: BlockManager):
        self.kv, self.block_size = kv, kv.block_size
        self.n = 0
        self._state = np.zeros((7, 16), _INT)
        self._rate = np.zeros(16)                    # per-token acceptance rate
        self._seqs = np.empty(16, dtype=object)

    def __len__(self) -> int:
        return self.n

    @property
    def rate(self) -> np.ndarray:
        return self._rate[:self.n]

    @property
    def seqs(self) -> list[Seq]:
        return self._seqs[:self.n].tolist()

    def append(self, seq: Seq) -> None:
        """A sequence whose prompt is cached (or swapped back in) starts decoding."""
        n = self.n
        if n == self._state.shape[1]:
            self._state = np.concatenate([self._state, np.zeros_like(self._state)], axis=1)
            self._rate = np.concatenate([self._rate, np.zeros_like(self._rate)])
            self._seqs = np.concatenate([self._seqs, np.empty_like(self._seqs)])
        self._state[:, n] = (seq.id, seq.context, seq.req.input_tokens + seq.req.output_tokens,
                             self.kv.blocks(seq.id), self.kv.tokens(seq.id), seq.spec_accepted, seq.spec_rejections)
        self._rate[n] = seq.acceptance
        self._seqs[n] = seq
        self.n += 1

    def reserve_growth(self, grow: int) -> np.ndarray:
        """New blocks each sequence needs for `grow` more KV tokens than it has now."""
        return (self.ctx - 1 + grow + self.block_size - 1) // self.block_size - self.blocks

    def sync(self, kv_tokens: np.ndarray) -> None:
        """The sequences now hold `kv_tokens` KV tokens: tell the block manager of those whose
        blocks change (append, or truncate below a reservation)."""
        need = (kv_tokens + self.block_size - 1) // self.block_size
        blocks, synced = self.blocks, self.synced
        changed = np.flatnonzero(need != blocks)
        if changed.size:
            kv = self.kv
            for sid, tokens, old, grows in zip(self.id[changed].tolist(), kv_tokens[changed].tolist(),
                                               synced[changed].tolist(), (need[changed] > blocks[changed]).tolist()):
                if grows:
                    kv.append(sid, tokens - old)
                else:
                    kv.truncate(sid, tokens)
            synced[changed] = kv_tokens[changed]
            blocks[:] = need

    def tell(self, i: int) -> None:
        """Bring the block manager's token count of sequence i up to date (no new block)."""
        tokens, synced = int(self.ctx[i]) - 1, int(self.synced[i])
        if tokens != synced:
            self.kv.append(int(self.id[i]), tokens - synced)
            self.synced[i] = tokens

    def remove(self, drop: np.ndarray) -> list[Seq]:
        """Take the sequences where `drop` is true out of the batch, their state written back."""
        n = self.n
        for i in np.flatnonzero(drop).tolist():
            self.write_back(i)
        out = self._seqs[:n][drop].tolist()
        mask = ~drop
        m = n - len(out)
        self._state[:, :m] = self._state[:, :n][:, mask]
        self._rate[:m] = self._rate[:n][mask]
        self._seqs[:m] = self._seqs[:n][mask]
        self._seqs[m:n] = None
        self.n = m
        return out

    def write_back(self, i: int) -> None:
        seq = self._seqs[i]
        ctx, accepted, rejected = self._state[[1, 5, 6], i].tolist()
        seq.generated = ctx - seq.req.input_tokens
        seq.spec_accepted, seq.spec_rejections = accepted, rejected

    def group_context(self, ctx: np.ndarray, pp: int) -> list[tuple[int, np.ndarray]]:
        """(sequences, context sums over the last axis) of each non-empty micro-batch: the
        batch split as `IterationModel.step_s` splits its works (every pp-th sequence)."""
        n = ctx.shape[-1]
        return [(len(range(g, n, pp)), ctx[..., g::pp].sum(axis=-1)) for g in range(min(pp, n))]


def run_step_s(model: IterationModel, groups: list[tuple[int, np.ndarray]], new_tokens: int = 1):
    """Step times of decode steps over these micro-batches (`DecodeBatch.group_context`),
    each sequence computing `new_tokens` (k + 1 to verify k drafts) with that many logits."""
    return model.batch_step_s([BatchSums.decode(n, c, new_tokens, new_tokens) for n, c in groups])


@dataclass
class DecodeRun:
    """Steps 0..J-1 of a decode run: times[j] to times[j + 1] is step j."""

    k: int
    times: np.ndarray       # J + 1 clock values, from the run's start
    draft_s: np.ndarray     # draft time of each step (0 without speculation)
    ctx: np.ndarray | None       # (J, n) contexts before each step (speculation)
    accepted: np.ndarray | None  # (J, n) drafts accepted (speculation)
    swap_s: float           # KV swaps before step 0
    grown: np.ndarray | None = None  # blocks the batch gained after step 0, by step (no speculation)

    @property
    def steps(self) -> int:
        return len(self.times) - 1


def clock(start_s: float, step_s: np.ndarray) -> np.ndarray:
    """Clock values after each step, accumulated one addition at a time as the event loop does."""
    return np.cumsum(np.concatenate(([start_s], step_s)))


class ServingEnvironment(simpy.Environment):
    """A simpy environment that can also fire an event at an absolute time.

    A run of steps must end at exactly the clock value the steps one by one reach; a timeout
    of t - now lands on now + (t - now), which can round to a neighbour of t (and no delay
    reaches t when the sum is a tie between two floats).
    """

    def timeout_at(self, t: float) -> simpy.Event:
        """An event that fires at `t` (>= now), ordered as a timeout created now would be."""
        delay = t - self.now
        if self.now + delay == t:
            return self.timeout(delay)
        if t < self.now:
            raise ValueError(f"t = {t!r} is before now ({self.now!r})")
        event = simpy.Event(self)
        event._ok, event._value = True, None  # what Timeout sets: a succeeded event with no value
        heapq.heappush(self._queue, (t, NORMAL, next(self._eid), event))
        return event
