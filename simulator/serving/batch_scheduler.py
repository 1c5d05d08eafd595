"""The static schedulers (vllm, sarathi) over a `DecodeBatch`, and the replica that runs them
with fast-forward: a run of identical decode steps is one simpy event.

`BatchScheduler` makes the decisions of `schedulers.StaticScheduler` (admission, prefill
priority or chunked prefill, preemption of the newest sequence when a step needs a block
the pool cannot give, swap-in first) with the running sequences held as arrays, and
`BatchReplica` asks it for a run of decode steps up to the next event (`batch.py`'s design
note) instead of one step at a time. Each run reports its steps to the recorder and each
sequence its times, as the step-by-step `Replica` does; `simulate_serving(exact_steps=True)`
runs that one instead, and a test holds the two to the same results.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from simulator.serving.batch import DecodeBatch, DecodeRun, ServingEnvironment, clock, run_step_s
from simulator.serving.iteration import BatchSums, IterationModel, Work
from simulator.serving.kv_cache import BlockManager
from simulator.serving.recorder import Recorder
from simulator.serving.replica import Replica
from simulator.serving.schedulers import StaticScheduler
from simulator.serving.sequence import Seq
from simulator.specs.serving import DeploymentSpec

SPEC_BLOCK_STEPS = 32  # speculative steps drawn at once (a run may use fewer)
SCALAR_STEPS = 16      # runs up to this long are computed on Python numbers, longer ones on arrays


@dataclass
class BatchStep:
    """One planned step: prompt chunks, and the whole decode batch (`decodes` sequences) or none."""

    kind: str
    prompts: list[Seq] = field(default_factory=list)
    works: list[Work] = field(default_factory=list)   # of the prompts
    chunks: list[int] = field(default_factory=list)   # of the prompts
    decodes: int = 0
    k: int = 0


class BatchScheduler(StaticScheduler):
    def __init__(self, deployment: DeploymentSpec, kv: BlockManager, speculator=None):
        super().__init__(deployment, kv, speculator)
        self.running = DecodeBatch(kv)
        self.reserved = 0  # blocks the planned step reserves that the block manager is not yet told of
        self.preempted = False  # whether planning the step preempted a sequence
        self.phase: list[int] | None = None  # DecodeBatch.block_phase when the step was planned
        self._prefill_s: dict[tuple[Work, ...], float] = {}  # step time of prefill-only steps

    # --- planning (the decisions of StaticScheduler) ---------------------------------------
    def _plan_prefill(self) -> BatchStep | None:
        step = super()._plan_prefill()
        return step and BatchStep("prefill", step.seqs, step.works, step.chunks)

    def _make_room(self, grow: int = 1, reserve: bool = True) -> int:
        """Preempt the newest sequences until every other can grow by `grow` KV tokens, and
        return how many sequences decode. Their blocks for those tokens are reserved in the
        block manager now, or (`reserve=False`, when nothing reads the pool before the step
        ends) counted in `self.reserved` and handed over when the step commits."""
        batch = self.running
        self.phase = batch.block_phase() if grow == 1 else None  # for the run's later steps too
        self.reserved = self.phase[0] if grow == 1 else int(batch.reserve_growth(grow).sum())
        short = self.reserved - self.kv.num_free_gpu_blocks
        self.preempted = short > 0
        if short > 0:  # each victim frees its blocks and needs no growth
            growth = batch.reserve_growth(grow)
            n = len(batch)
            victims = min(int(np.searchsorted(np.cumsum((growth + batch.blocks_of(batch.ctx - 1))[::-1]), short)) + 1, n)
            for i in range(n - victims, n):
                batch.settle(i)
            for seq in reversed(batch.remove(list(range(n - victims, n)))):  # the newest first
                self._preempt(seq)
            self.reserved = int(growth[:n - victims].sum())
        if reserve:
            batch.sync(batch.ctx - 1 + grow)
            self.reserved = 0
        return len(batch)

    def _plan_decode(self) -> BatchStep | None:
        batch = self.running
        if not batch:
            return None
        k = self.speculator.k_for_batch(len(batch), lambda: (batch.ctx, batch.accepted, batch.rejected)) \
            if self.speculator else 0
        n = self._make_room(k + 1, reserve=False)
        return BatchStep("decode", decodes=n, k=k) if n else None

    def _plan_chunked(self) -> BatchStep | None:
        n = self._make_room()
        budget = max(0, self.chunk - n)
        step = BatchStep("decode" if n else "prefill", decodes=n)
        for seq in list(self.prefilling):  # continue prompts already started
            take = min(seq.prompt_len - seq.prefilled, budget)
            if take <= 0 or not self.kv.can_append(seq.id, take):
                continue
            self.kv.append(seq.id, take)
            self._add_prompt(step, seq, take, Work(take, seq.prefilled, seq.prefilled + take == seq.prompt_len))
            budget -= take
        for seq, take in self._admit(budget):
            self.prefilling.append(seq)
            self._add_prompt(step, seq, take, Work(take, seq.prefilled, seq.prefilled + take == seq.prompt_len))
        if not n and not step.prompts:
            return None
        if n and step.prompts:
            step.kind = "mixed"
        return step

    @staticmethod
    def _add_prompt(step: BatchStep, seq: Seq, take: int, work: Work) -> None:
        step.prompts.append(seq)
        step.chunks.append(take)
        step.works.append(work)

    # --- time ------------------------------------------------------------------------------
    def step_sums(self, step: BatchStep, pp: int) -> list[BatchSums]:
        """Micro-batch sums of a single step: the decodes first, then the prompt chunks, split
        every pp-th as `IterationModel.step_s` splits its works."""
        n, batch = step.decodes, self.running
        groups = []
        for g in range(pp):
            prompts = step.works[(g - n) % pp::pp] if len(step.works) > (g - n) % pp else []
            sums = BatchSums.of(prompts) if prompts else None
            if g < n:
                ctx = batch.ctx[g::pp]
                dec = BatchSums.decode(len(ctx), int(ctx.sum()), step.k + 1, step.k + 1)
                sums = dec if sums is None else dec + sums
            if sums is not None:
                groups.append(sums)
        return groups

    def step_s(self, step: BatchStep, model: IterationModel) -> float:
        """Time of a single step; prefill-only steps (no context to read but their chunks'),
        which repeat, are remembered."""
        if step.decodes:
            return float(model.batch_step_s(self.step_sums(step, model.layout.pp)))
        key = tuple(step.works)
        time_s = self._prefill_s.get(key)
        if time_s is None:
            time_s = self._prefill_s[key] = float(model.batch_step_s(self.step_sums(step, model.layout.pp)))
        return time_s

    def decode_run(self, step: BatchStep, model: IterationModel, swap_s: float, start_s: float,
                   horizon_s: float) -> DecodeRun:
        """Decode steps from `start_s` (the first one planned, its preemptions done) up to the
        next event, and the last one ending before `horizon_s` (at least one step)."""
        batch, k, pp = self.running, step.k, model.layout.pp
        free = self.kv.num_free_gpu_blocks - self.reserved  # after the first step's reservation
        steps = int((batch.end - batch.ctx).min())  # the first completion ends the run
        if self.preempted:  # the victims' blocks may let the next step swap in or admit
            steps = 1
        if k:
            steps, ctx, accepted = self._draw(k, steps)
            groups = batch.group_context(ctx, pp)
            draft = self._draft_s(ctx, k)
            grown = None
        else:
            if steps > SCALAR_STEPS:  # step j >= 1 needs a block for each sequence whose KV tokens fill their last block
                bs = self.kv.block_size
                grown = np.cumsum(np.concatenate(([0], np.asarray(self.phase)[(-np.arange(1, steps)) % bs])))
                over = np.flatnonzero(grown > free)
                if over.size:
                    steps = int(over[0])
            if steps <= SCALAR_STEPS:  # a busy replica's short runs: step by step, in scalars
                return self._short_run(model, steps, swap_s, start_s, horizon_s, free)
            js = np.arange(steps, dtype=np.int64)
            groups = [(n, c + n * js) for n, c in batch.group_context(batch.ctx, pp)]
            ctx = accepted = None
            draft = np.zeros(steps)
        swaps = np.zeros(steps)
        swaps[0] = swap_s
        times = clock(start_s, (swaps + draft) + run_step_s(model, groups, k + 1))
        keep = max(1, int(np.searchsorted(times[1:], horizon_s, side="left")))
        if k and keep < steps:  # draw again exactly what the kept steps use
            self._rewind(k, keep)
        keep = min(keep, steps)
        return DecodeRun(k, times[:keep + 1].tolist(), draft[:keep], None if ctx is None else ctx[:keep],
                         None if accepted is None else accepted[:keep], swap_s,
                         None if grown is None else grown[:keep].tolist())

    def _short_run(self, model: IterationModel, steps: int, swap_s: float, start_s: float,
                   horizon_s: float, free: int) -> DecodeRun:
        """`decode_run` without speculation for a few steps: the same sums, block counts and
        additions on Python numbers, cheaper than arrays at this length."""
        base = [(n, int(c)) for n, c in self.running.group_context(self.running.ctx, model.layout.pp)]
        step_s, phase, bs = model.decode_step_s, self.phase, self.kv.block_size
        t = start_s + (swap_s + 0.0 + step_s(base))
        times, grown, g = [start_s, t], [0], 0
        for j in range(1, steps):
            g += phase[-j % bs]  # step j needs a block for each sequence whose KV tokens fill their last block
            if g > free:
                break
            t = t + (0.0 + 0.0 + step_s([(n, c + n * j) for n, c in base]))
            if t >= horizon_s:
                break
            times.append(t)
            grown.append(g)
        return DecodeRun(0, times, None, None, None, swap_s, grown)

    def _draw(self, k: int, max_steps: int) -> tuple[int, np.ndarray, np.ndarray]:
        """Steps of a speculative run before a completion or a preemption, with the contexts
        before each step and the drafts accepted, from a block of draws."""
        batch, rng = self.running, self.speculator.rng
        steps = 1 if self.speculator.spec.policy == "goodput" else min(max_steps, SPEC_BLOCK_STEPS)
        self._state = rng.bit_generator.state
        accepted = np.minimum(k, rng.geometric(np.broadcast_to(1.0 - batch.rate, (steps, len(batch)))) - 1)
        after = batch.ctx + np.cumsum(accepted + 1, axis=0)  # no cap needed: the run ends at a completion
        ctx = np.vstack([batch.ctx, after[:-1]])
        done = np.flatnonzero((after >= batch.end).any(axis=1))
        if done.size:
            steps = int(done[0]) + 1
        bs = self.kv.block_size
        pool = self.kv.num_free_gpu_blocks + batch.total_blocks
        over = np.flatnonzero(((ctx[1:steps] + k + bs - 1) // bs).sum(axis=1) > pool)
        if over.size:
            steps = int(over[0]) + 1
        if steps < len(accepted):
            self._rewind(k, steps)
        return steps, ctx[:steps], accepted[:steps]

    def _rewind(self, k: int, steps: int) -> None:
        """Put the generator where drawing `steps` steps of the batch leaves it."""
        rng = self.speculator.rng
        rng.bit_generator.state = self._state
        rng.geometric(np.broadcast_to(1.0 - self.running.rate, (steps, len(self.running))))

    def _draft_s(self, ctx: np.ndarray, k: int) -> np.ndarray:
        draft = self.speculator.cost.draft
        if draft is None:
            return np.zeros(len(ctx))
        return k * run_step_s(draft, self.running.group_context(ctx, draft.layout.pp))

    # --- committing --------------------------------------------------------------------------
    def commit_run(self, run: DecodeRun, now: float) -> tuple[list[Seq], np.ndarray]:
        """Apply a run of decode steps ending at `now`: the finished sequences, and the KV
        utilization after each step."""
        batch, kv, k, steps = self.running, self.kv, run.k, run.steps
        bs = kv.block_size
        if self.speculator:
            self.speculator.record_step(k, steps)
        if run.accepted is None:  # blocks after step j: the first step's reservation, and grown[j]
            base = kv.num_used_gpu_blocks + self.reserved
            used = [base + g for g in run.grown]
            batch.advance(steps)
            batch.hold(batch.total_blocks + self.reserved + run.grown[-1])
        else:
            self.speculator.record_draws(k, run.accepted)
            batch.accepted = batch.accepted + run.accepted.sum(axis=0)
            batch.rejected = batch.rejected + (run.accepted < k).sum(axis=0)
            after = np.minimum(run.ctx + run.accepted + 1, batch.end)
            others = kv.num_used_gpu_blocks - batch.total_blocks
            used = (others + ((after - 1 + bs - 1) // bs).sum(axis=1)).tolist()
            batch.ctx = after[-1]
            batch.sync(batch.ctx - 1)
        self.reserved = 0
        finished = self._finish(now)
        used[-1] = kv.num_used_gpu_blocks
        total = kv.num_gpu_blocks
        return finished, [u / total for u in used] if total else [0.0] * len(used)

    def _finish(self, now: float) -> list[Seq]:
        batch = self.running
        done = np.flatnonzero(batch.ctx >= batch.end).tolist()
        if not done:
            return []
        finished = batch.remove(done, finished=True)
        for seq in finished:
            seq.finish_s = now
            self.kv.free(seq.id)
        return finished

    def commit(self, step: BatchStep, now: float) -> list[Seq]:
        """Apply a single (prefill or mixed) step: its decodes gain a token, then its prompts."""
        finished = []
        if step.decodes:
            self.running.advance(1)
            self.running.sync(self.running.ctx - 1)
            finished = self._finish(now)
        for seq, chunk in zip(step.prompts, step.chunks):
            if self._commit_prompt(seq, chunk, now) and seq.done:
                self.kv.free(seq.id)
                finished.append(seq)
        return finished


class BatchReplica(Replica):
    """`replica.Replica` with a `BatchScheduler`: a run of decode steps is one simpy event."""

    def __init__(self, env: ServingEnvironment, index: int, scheduler: BatchScheduler,
                 model: IterationModel, recorder: Recorder, host_link_bytes_per_s: float,
                 next_arrival_s: Callable[[], float]):
        self.next_arrival_s = next_arrival_s
        super().__init__(env, index, scheduler, model, recorder, host_link_bytes_per_s)

    def run(self):
        env, sched, rec, i = self.env, self.sched, self.rec, self.index
        while True:
            step = None if sched.idle else sched.plan()
            if step is None:
                if not sched.idle and not sched.running and not sched.prefilling:
                    raise RuntimeError(f"replica {i}: waiting requests never fit in the KV cache")
                self.wake = env.event()
                yield self.wake
                continue
            start = env.now
            swap_s = sched.take_swapped_tokens() * self.swap_s_per_token  # swaps stall the step
            if swap_s:
                rec.box(i, "kv", "swap", start, start + swap_s)
            if step.prompts or not step.decodes:
                yield env.timeout(swap_s + 0.0 + sched.step_s(step, self.model))
                finished = sched.commit(step, env.now)
                rec.step(i, step.kind, start, env.now, len(step.prompts) + step.decodes,
                         sum(step.chunks) + step.decodes, sched.kv.utilization)
            else:
                run = sched.decode_run(step, self.model, swap_s, start, self.next_arrival_s())
                yield env.timeout_at(float(run.times[-1]))
                n = step.decodes
                finished, util = sched.commit_run(run, env.now)
                rec.steps_run(i, "decode", run.times, n, n * (run.k + 1), util, self._boxes(run))
            self.outstanding -= len(finished)

    def _boxes(self, run: DecodeRun):
        """Step j's draft box, as `Replica` records it (the swap box is already recorded)."""
        def boxes(j: int):
            if not run.k:
                return ()
            start = float(run.times[j]) + (run.swap_s if j == 0 else 0.0)
            return (("compute", f"draft x{run.k}", start, start + float(run.draft_s[j])),)
        return boxes
