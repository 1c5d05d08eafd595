"""Dynamic re-sharding (Seesaw, Su et al., MLSys'25): prefill in one layout, decode in another.

Design note. A replica alternates between two phases with different (tp, pp):
- prefill phase (layout P, typically pipeline-heavy: no all-reduce per token): waiting
  prompts are prefilled in batches; each prompt's KV is copied to a CPU KV buffer on a copy
  stream that overlaps the following prefill steps (tiered KV buffering);
- transition P -> D: the pending copies finish, then every device loads its decode-layout
  weight shard (from the CPU copy over PCIe, or re-sharded over NVLink where GPUs have it);
- decode phase (layout D, typically tensor-heavy: weights read once per step across more
  GPUs): sequences are swapped in from the buffer as GPU KV space allows, each copy
  prefetched on the copy stream while earlier sequences decode; a sequence decodes once
  its KV has arrived;
- transition D -> P: weights are reloaded in the prefill layout.
As in the static schedulers, a pp-stage layout schedules pp micro-batches per step, each
within max_batched_tokens and max_num_seqs. Transition-minimizing scheduling: switch to decode only when the CPU buffer is full or no
request waits; switch back to prefill only when the buffer is empty and every buffered
sequence has finished decoding. Each phase, copy and transition is a box in the trace.
The policy is four pure functions of the queues (`next_phase`, `prefill_take`,
`decode_take`, `decode_evictions`), which the real engine's re-sharding deployments
(executor/serving/reshard.py) import, so the simulated and the measured schedule agree.

Fast-forward (unless `exact_steps`): within the decode phase, the steps between two events
run as one simpy event, as the static schedulers' runs do (`batch.py`): the set of
sequences that decode is the same until one completes, a prefetched KV copy arrives (the
step starting at or after its arrival takes the sequence in), or the KV grows past the
GPU pool; no sequence can be admitted in between, since the KV in use only grows. Step
times come from `IterationModel.decode_step_s` on the same integer sums, and the clock
advances by the same additions, so every time is that of the step-by-step loop.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable

import simpy

from simulator.serving.iteration import IterationModel, Work
from simulator.serving.recorder import Recorder
from simulator.serving.sequence import Seq
from simulator.specs.hardware import GB, ClusterSpec
from simulator.specs.serving import DeploymentSpec

KV_WATERMARK = 0.95  # decode admits sequences while KV use stays below this fraction


# --- the policy: pure functions of the queues, shared with the real engine (executor/serving/reshard.py)

def next_phase(layout: str, can_prefill: bool, buffered: bool, decoding: bool, waiting: bool) -> str | None:
    """The phase to run now, transition-minimizing (None: nothing to do, stay as is).

    In the prefill layout, prefill while a batch fits (`prefill_take`); then decode if the
    CPU buffer holds anything. In the decode layout, decode until the buffer is empty and
    every buffered sequence has finished; then prefill if a request waits."""
    if layout == "prefill":
        if can_prefill:
            return "prefill"
        return "decode" if buffered else None
    if buffered or decoding:
        return "decode"
    return "prefill" if waiting else None


def prefill_take(waiting: deque[Seq], dep: DeploymentSpec, capacity_tokens: int, buffered: int,
                 buffer_tokens: int) -> int:
    """How many sequences at the front of `waiting` the next prefill step takes: pp
    micro-batches' worth of max_num_seqs and max_batched_tokens (one prompt always, if it
    fits), within the layout's KV capacity and the room left in the CPU buffer (0: the buffer
    is full or nothing waits)."""
    n, tokens = 0, 0
    while n < len(waiting) and n < dep.max_num_seqs * dep.prefill.pp:
        need = waiting[n].prompt_len
        if (n and tokens + need > dep.max_batched_tokens * dep.prefill.pp) \
                or tokens + need > capacity_tokens or buffered + tokens + need > buffer_tokens:
            break
        n += 1
        tokens += need
    return n


def decode_take(buffer: deque[Seq], running: int, used: int, dep: DeploymentSpec, capacity_tokens: int) -> int:
    """How many sequences at the front of the CPU buffer join the decode phase now, with
    `running` already in it holding `used` tokens of KV: up to pp x max_num_seqs, while KV use
    stays below KV_WATERMARK of the capacity (an idle layout always takes one: it fits, see
    check_deployment, and otherwise would never decode)."""
    n = 0
    while n < len(buffer) and running + n < dep.max_num_seqs * dep.decode.pp \
            and (not running + n or used + buffer[n].context + 1 <= KV_WATERMARK * capacity_tokens):
        used += buffer[n].context
        n += 1
    return n


def decode_evictions(contexts: list[int], used: int, capacity_tokens: int) -> int:
    """How many of the newest running sequences (contexts oldest first) go back to the CPU
    buffer because the KV grew past the decode layout's capacity."""
    n = 0
    while used > capacity_tokens:
        n += 1
        used -= contexts[-n]
    return n


def weight_reload_s(cluster: ClusterSpec, target: IterationModel) -> float:
    """Load every device's shard of the target layout: over NVLink where GPUs have it (the
    shards are exchanged between GPUs), else from the host copy over PCIe."""
    if cluster.intra_node_link == "nvlink" and cluster.device.nvlink_bandwidth_GBps > 0:
        bw = cluster.device.nvlink_bandwidth_GBps * GB * cluster.device.efficiency.intra_node.efficiency
    else:
        bw = cluster.host_link_bytes_per_s()
    return target.weight_bytes_per_device() / bw


class SeesawReplica:
    def __init__(self, env: simpy.Environment, index: int, deployment: DeploymentSpec,
                 prefill: IterationModel, decode: IterationModel, capacity_tokens: dict[str, int],
                 buffer_tokens: int, cluster: ClusterSpec, recorder: Recorder,
                 next_arrival_s: Callable[[], float] | None = None):
        self.env, self.index, self.dep, self.rec = env, index, deployment, recorder
        self.next_arrival_s = next_arrival_s  # fast-forward the decode phase up to it (None: step by step)
        self.models = {"prefill": prefill, "decode": decode}
        self.capacity = capacity_tokens
        self.buffer_tokens = buffer_tokens
        self.reload_s = {"prefill": weight_reload_s(cluster, prefill), "decode": weight_reload_s(cluster, decode)}
        self.pcie = cluster.host_link_bytes_per_s()
        self.waiting: deque[Seq] = deque()
        self.buffer: deque[Seq] = deque()
        self.buffered = 0            # tokens of KV in the CPU buffer
        self.copy_free_s = 0.0       # when the copy stream is next free
        self.outstanding = 0
        self.layout = "prefill"      # whose weights the GPUs hold now
        self.wake = env.event()
        self.process = env.process(self.run())

    def submit(self, seq: Seq) -> None:
        self.waiting.append(seq)
        self.outstanding += 1
        if not self.wake.triggered:
            self.wake.succeed()

    def _copy(self, tokens: int, layout: str, name: str) -> float:
        """Queue a KV copy on the copy stream; return when it completes."""
        start = max(self.copy_free_s, self.env.now)
        self.copy_free_s = start + tokens * self.models[layout].kv_bytes_per_token_per_device() / self.pcie
        self.rec.box(self.index, "kv", name, start, self.copy_free_s, tokens=tokens)
        return self.copy_free_s

    def run(self):
        while True:
            can_prefill = prefill_take(self.waiting, self.dep, self.capacity["prefill"], self.buffered,
                                       self.buffer_tokens) > 0
            phase = next_phase(self.layout, can_prefill, bool(self.buffer), False, bool(self.waiting))
            if phase is None:
                self.wake = self.env.event()
                yield self.wake
                continue
            if self.layout != phase:
                yield from self._transition(phase)
            yield from (self._prefill_phase() if phase == "prefill" else self._decode_phase())

    def _transition(self, to: str):
        start = self.env.now
        yield self.env.timeout(max(0.0, self.copy_free_s - start) + self.reload_s[to])
        self.layout = to
        self.rec.transition(self.index, f"to {to}", start, self.env.now)

    def _prefill_phase(self):
        model, dep = self.models["prefill"], self.dep
        while self.waiting:
            n = prefill_take(self.waiting, dep, self.capacity["prefill"], self.buffered, self.buffer_tokens)
            if not n:
                return  # the buffer is full: decode
            batch = [self.waiting.popleft() for _ in range(n)]
            tokens = sum(s.prompt_len for s in batch)
            start = self.env.now
            yield self.env.timeout(model.step_s([Work(s.prompt_len, 0, True) for s in batch]))
            self.rec.step(self.index, "prefill", start, self.env.now, len(batch), tokens, tokens / self.capacity["prefill"])
            for seq in batch:
                seq.prefilled, seq.decoding = seq.prompt_len, True
                seq.emit(self.env.now)
                if seq.done:
                    self.outstanding -= 1
                    continue
                self.buffer.append(seq)
                self.buffered += seq.context
                self._copy(seq.context, "prefill", "kv to cpu")

    def _decode_phase(self):
        model, cap = self.models["decode"], self.capacity["decode"]
        running: list[tuple[float, Seq]] = []  # (KV ready time, seq)
        used = 0
        while self.buffer or running:
            # an idle GPU always takes one sequence (it fits: check_deployment), else it never decodes
            for _ in range(decode_take(self.buffer, len(running), used, self.dep, cap)):
                seq = self.buffer.popleft()
                self.buffered -= seq.context
                used += seq.context
                running.append((self._copy(seq.context, "decode", "kv to gpu"), seq))
            ready = [s for t, s in running if t <= self.env.now]
            if not ready:
                yield self.env.timeout(min(t for t, _ in running) - self.env.now)
                continue
            start = self.env.now
            if self.next_arrival_s is None:
                yield self.env.timeout(model.step_s([Work(1, s.context, True) for s in ready]))
                steps = 1
            else:
                times = self._run(model, ready, used, min((t for t, _ in running if t > start), default=math.inf))
                steps = len(times) - 1
                yield self.env.timeout_at(times[-1])
                n = len(ready)
                if steps > 1:  # the steps before the last change nothing but counters
                    self.rec.steps_run(self.index, "decode", times[:-1], n, n,
                                       [(used + n * (j + 1)) / cap for j in range(steps - 1)])
                start = times[-2]
            for seq in ready:
                seq.emit(self.env.now, steps)
                used += steps
            finished = [s for s in ready if s.done]
            self.outstanding -= len(finished)
            used -= sum(s.context for s in finished)
            running = [(t, s) for t, s in running if not s.done]
            for _ in range(decode_evictions([s.context for _, s in running], used, cap)):
                _, seq = running.pop()  # KV grew past the GPU pool: the newest goes back to the buffer
                used -= seq.context
                self.buffer.appendleft(seq)
                self.buffered += seq.context
                self._copy(seq.context, "decode", "kv to cpu")
            self.rec.step(self.index, "decode", start, self.env.now, len(ready), len(ready), used / cap)

    def _run(self, model: IterationModel, ready: list[Seq], used: int, copy_s: float) -> list[float]:
        """Clock values of the decode steps of `ready` from now up to the next event: the step
        that completes a sequence, or takes the KV past the pool, or ends at or after the next
        KV copy arrival (`copy_s`) or, but for the first, the next request's arrival."""
        pp, n, cap = model.layout.pp, len(ready), self.capacity["decode"]
        base = [(len(ready[g::pp]), sum(s.context for s in ready[g::pp])) for g in range(min(pp, n))]
        steps = min(s.req.output_tokens - s.generated for s in ready)  # the first completion
        steps = min(steps, max(1, -(-(cap + 1 - used) // n)))            # the KV past the pool
        arrival = self.next_arrival_s()
        times = [self.env.now]
        for j in range(steps):
            end = times[-1] + model.decode_step_s([(m, c + m * j) for m, c in base])
            if j and end >= arrival:  # a later step must end before the router looks at this replica
                break
            times.append(end)
            if end >= copy_s:  # the next step takes the arrived sequence in
                break
        return times
