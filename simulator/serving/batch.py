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

`DecodeBatch` keeps its sequences' KV blocks as an array and tells the block manager of
their growth in bulk: one `BlockManager.append_batch` per event for the blocks the whole
batch gained (or gave back), so the pool totals are exact after every event. A sequence's
own entry in the block manager is brought up to date (`BlockManager.settle`) only when it is
preempted; a finished one gives its batch blocks back in the same single call.
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

    KV blocks. Between events every sequence holds the blocks of its KV tokens (context - 1)
    and no more: a step's reservation is either given back or used by the time the step
    commits. So the batch keeps no per-sequence block count, only the total it holds
    (`total_blocks`), how many of them are each sequence's own in the block manager (`own`),
    and how many sequences are at each offset in their last block (`block_phase`): plain
    decode steps move every sequence by the same offset, so that histogram only rotates,
    and is kept as counts of (context - 1 - `steps`) modulo the block size.
    """

    # id: the request's; end: the context at which the sequence is done; own: KV blocks in the
    # sequence's entry of the block manager (the rest are in the batch's); accepted, rejected:
    # speculative decoding's drafts accepted so far and steps that rejected a draft
    id, end, own, accepted, rejected = (_field(i) for i in (0, 2, 3, 4, 5))

    def __init__(self, kv: BlockManager):
        self.kv, self.block_size = kv, kv.block_size
        self.n = 0
        self._state = np.zeros((6, 16), _INT)
        self._rate = np.zeros(16)                    # per-token acceptance rate
        self._seqs: list[Seq] = []
        self.total_blocks = 0                        # KV blocks the sequences hold
        self.steps = 0                               # plain decode steps taken (advance)
        self._phase: np.ndarray | None = np.zeros(self.block_size, _INT)

    def __len__(self) -> int:
        return self.n

    @property
    def ctx(self) -> np.ndarray:
        """Context of each sequence (input + generated tokens)."""
        return self._state[1, :self.n]

    @ctx.setter
    def ctx(self, value) -> None:
        self._state[1, :self.n] = value
        self._phase = None  # recounted when next asked for

    @property
    def rate(self) -> np.ndarray:
        return self._rate[:self.n]

    @property
    def seqs(self) -> list[Seq]:
        return list(self._seqs)

    def blocks_of(self, tokens):
        """Blocks that hold `tokens` KV tokens (ceil division; ints or arrays)."""
        return (tokens + self.block_size - 1) // self.block_size

    def append(self, seq: Seq) -> None:
        """A sequence whose prompt is cached (or swapped back in) starts decoding."""
        n = self.n
        if n == self._state.shape[1]:
            self._state = np.concatenate([self._state, np.zeros_like(self._state)], axis=1)
            self._rate = np.concatenate([self._rate, np.zeros_like(self._rate)])
        blocks = self.kv.blocks(seq.id)
        ctx = seq.context
        self._state[:, n] = (seq.id, ctx, seq.req.input_tokens + seq.req.output_tokens,
                             blocks, seq.spec_accepted, seq.spec_rejections)
        self._rate[n] = seq.acceptance
        self._seqs.append(seq)
        self.total_blocks += blocks
        if self._phase is not None:
            self._phase[(ctx - 1 - self.steps) % self.block_size] += 1
        self.n += 1

    def advance(self, steps: int) -> None:
        """Every sequence gains `steps` tokens (plain decode steps)."""
        self._state[1, :self.n] += steps
        self.steps += steps

    def block_phase(self) -> list[int]:
        """How many sequences hold each number of KV tokens modulo the block size: those at 0
        need a new block for their next token, those at bs - 1 for the one after, and so on
        (a sequence at phase p needs one at step j, from 0, when (p + j) % bs == 0)."""
        bs = self.block_size
        if self._phase is None:
            self._phase = np.bincount((self.ctx - 1 - self.steps) % bs, minlength=bs)
        counts, r = self._phase.tolist(), -self.steps % bs
        return counts[r:] + counts[:r]

    def reserve_growth(self, grow: int) -> np.ndarray:
        """New blocks each sequence needs for `grow` more KV tokens than it has now."""
        tokens = self.ctx - 1
        return self.blocks_of(tokens + grow) - self.blocks_of(tokens)

    def sync(self, kv_tokens: np.ndarray) -> None:
        """The sequences now hold `kv_tokens` KV tokens (a reservation included): tell the block
        manager how many blocks the batch gained or gave back, in one call."""
        self.hold(int(self.blocks_of(kv_tokens).sum()))

    def hold(self, total_blocks: int) -> None:
        """The sequences now hold `total_blocks` KV blocks in all: one call to the block manager."""
        if total_blocks != self.total_blocks:
            self.kv.append_batch(total_blocks - self.total_blocks)
            self.total_blocks = total_blocks

    def settle(self, i: int) -> None:
        """Make sequence i's blocks its own in the block manager, at its current KV tokens
        (before it is preempted)."""
        tokens = int(self._state[1, i]) - 1
        self.kv.settle(int(self._state[0, i]), tokens)
        self._state[3, i] = self.blocks_of(tokens)

    def remove(self, where: list[int], finished: bool = False) -> list[Seq]:
        """Take the sequences at these (increasing) positions out of the batch, their state
        written back: `finished` ones give their batch blocks back to the block manager, the
        others must hold only their own (`settle`)."""
        n, bs = self.n, self.block_size
        rows = [self._state[:, where[0]].tolist()] if len(where) == 1 else self._state[:, where].T.tolist()
        out = [self._seqs[i] for i in where]
        held = blocks = 0
        phase, steps = self._phase, self.steps
        for seq, (_, ctx, _, own, accepted, rejected) in zip(out, rows):
            seq.generated = ctx - seq.req.input_tokens
            seq.spec_accepted, seq.spec_rejections = accepted, rejected
            mine = (ctx - 1 + bs - 1) // bs
            held += mine - own
            blocks += mine
            if phase is not None:
                phase[(ctx - 1 - steps) % bs] -= 1
        if finished and held:
            self.kv.append_batch(-held)
        elif held:
            raise ValueError(f"sequences {[s.id for s in out]} leave holding {held} blocks of the batch")
        self.total_blocks -= blocks
        if len(where) == 1:  # the common case: shift the rows after it down by one
            i = where[0]
            self._state[:, i:n - 1] = self._state[:, i + 1:n]
            self._rate[i:n - 1] = self._rate[i + 1:n]
        else:
            keep = np.ones(n, bool)
            keep[where] = False
            m = n - len(out)
            self._state[:, :m] = self._state[:, :n][:, keep]
            self._rate[:m] = self._rate[:n][keep]
        for i in reversed(where):
            del self._seqs[i]
        self.n = n - len(out)
        return out

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
    times: list[float]      # J + 1 clock values, from the run's start
    draft_s: np.ndarray     # draft time of each step (speculation)
    ctx: np.ndarray | None       # (J, n) contexts before each step (speculation)
    accepted: np.ndarray | None  # (J, n) drafts accepted (speculation)
    swap_s: float           # KV swaps before step 0
    grown: list[int] | None = None  # blocks the batch gained after step 0, by step (no speculation)

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
