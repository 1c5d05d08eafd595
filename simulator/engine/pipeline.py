"""Discrete-event simulation of one pipeline-parallel training iteration (simpy).

Owns the timing rules: when an op may start (its input has arrived and its stage's compute
stream is free), what sending an activation or gradient costs, how DP gradient buckets
overlap the last backward of each chunk, and when the optimizer runs. The op order of each
stage comes from schedules.py; per-op costs come in through pipeline_api.py.

Design notes
- Each stage is one simpy process that walks its op list. An op whose input has not been
  produced yet waits on a simpy Event stored under the op's key; the producer fires it when
  it finishes. An input that is produced but still in flight costs no event: the op's single
  timeout simply starts later. So an op costs one or two events, never a polling loop.
- A p2p stream (one per sender stage and direction) and the DP stream (one per stage) each
  have exactly one issuer, which issues work in non-decreasing ready time. For such a
  stream a FIFO simpy Resource grants work at start = max(ready, previous end), so `_Stream`
  keeps just that previous end: the same timeline without a process and a Resource request
  per transfer (for p=16, v=3, m=256 those alone would cost about 3x the whole run).
- Tie-break: simpy orders same-time events by (time, priority, insertion); stage processes
  are started in stage order. Times never depend on it, because every stream serves its
  work in issue order. The trace is sorted by the explicit key (start_s, stage, stream).
- A micro-batch holds its activations from the start of its forward to the end of its
  backward on the same stage; both are on that stage's sequential compute stream, so the
  in-flight peak follows from the op order alone (`_peak_inflight`).
"""

from __future__ import annotations

from collections import Counter

import simpy

from simulator.engine.pipeline_api import (
    ChunkCost,
    PipelineConfig,
    PipelineResult,
    StageCost,
    StageTimeline,
    TraceEvent,
)
from simulator.engine.schedules import Op, stage_ops
from simulator.errors import SpecError

_STREAM_RANK = {"compute": 0, "p2p": 1, "dp": 2}


class _Stream:
    """A FIFO stream with a single issuer that issues in non-decreasing ready time."""

    __slots__ = ("free_s",)

    def __init__(self) -> None:
        self.free_s = 0.0

    def reserve(self, ready_s: float, duration_s: float) -> tuple[float, float]:
        start = ready_s if ready_s > self.free_s else self.free_s
        self.free_s = start + duration_s
        return start, self.free_s


class _Sim:
    """Shared state of one run: arrival times of op inputs, waiting ops, p2p streams."""

    def __init__(self, config: PipelineConfig, record_events: bool):
        self.env = simpy.Environment()
        self.p2p_s = config.p2p_s
        self.ready: dict[tuple, float] = {}          # op key -> when its input has arrived
        self.waiters: dict[tuple, simpy.Event] = {}  # op key -> event of the op waiting on it
        self.p2p = {(s, k): _Stream() for s in range(config.num_stages) for k in "FB"}
        self.events: list[TraceEvent] | None = [] if record_events else None

    def send(self, s: int, op: Op, out: tuple, t: float) -> None:
        """Deliver op's output (finished at t on stage s) to the op keyed `out`."""
        dst = out[1]
        if dst != s:  # a stage's output to itself (p == 1, last virtual stage) is free
            t0, t = self.p2p[s, op.kind].reserve(t, self.p2p_s)
            if self.events is not None and t > t0:
                what = "act" if op.kind == "F" else "grad"
                self.events.append(TraceEvent(
                    s, "p2p", f"{what} {op.kind}{op.microbatch}.c{op.chunk}", t0, t,
                    {"mb": op.microbatch, "chunk": op.chunk, "to": dst}))
        self.ready[out] = t
        waiter = self.waiters.pop(out, None)
        if waiter is not None:
            waiter.succeed()


def _consumer(op: Op, s: int, p: int, v: int) -> tuple | None:
    """Key (kind, stage, chunk, mb) of the op that needs `op`'s output, or None.

    Chunk c of stage s is virtual stage c*p + s: activations flow up the virtual stages and
    gradients down; the last virtual stage computes the loss and starts its own backward.
    """
    kind, c, j = op
    if kind == "F":
        if s < p - 1:
            return ("F", s + 1, c, j)
        return ("F", 0, c + 1, j) if c < v - 1 else ("B", s, c, j)
    if s > 0:
        return ("B", s - 1, c, j)
    return ("B", p - 1, c - 1, j) if c > 0 else None


def _plan(s: int, ops: list[Op], stage: StageCost, p: int, v: int) -> list[tuple]:
    """Per op: (op, duration, key it waits on or None, consumer key or None)."""
    plan = []
    for op in ops:
        chunk = stage.chunks[op.chunk]
        cost = chunk.forward if op.kind == "F" else chunk.backward
        has_input = op.kind == "B" or s > 0 or op.chunk > 0
        key = (op.kind, s, op.chunk, op.microbatch) if has_input else None
        plan.append((op, cost.duration_s, key, _consumer(op, s, p, v)))
    return plan


def _run_stage(sim: _Sim, s: int, plan: list[tuple], stage: StageCost,
               config: PipelineConfig, out: dict[int, tuple[float, float, float]]):
    """Process of stage s: its compute stream, then DP sync, optimizer and param sync.

    Stores (compute_end_s, dp_end_s, end_s) in out[s].
    """
    env, ready, waiters, events = sim.env, sim.ready, sim.waiters, sim.events
    clock = 0.0
    last_backward: dict[int, tuple[float, float]] = {}  # chunk -> (start, duration)
    for op, dur, key, consumer in plan:
        if key is not None:
            t = ready.get(key)
            if t is None:
                waiters[key] = event = env.event()
                yield event
                t = ready[key]
            if t > clock:
                clock = t
        start = clock
        clock = start + dur
        if op.kind == "B":
            last_backward[op.chunk] = (start, dur)
        if events is not None:
            events.append(TraceEvent(s, "compute", f"{op.kind}{op.microbatch}.c{op.chunk}",
                                     start, clock, {"mb": op.microbatch, "chunk": op.chunk}))
        delay = clock - env.now
        yield env.timeout(delay if delay > 0.0 else 0.0)
        if consumer is not None:
            sim.send(s, op, consumer, clock)
    dp_end = _grad_sync(s, stage, last_backward, clock, config.overlap_grad_reduce, events)
    opt_start = max(clock, dp_end)
    opt_end = opt_start + stage.optimizer_s
    end = opt_end + stage.param_sync_s
    if events is not None:
        if stage.optimizer_s > 0:
            events.append(TraceEvent(s, "compute", "optimizer", opt_start, opt_end))
        if stage.param_sync_s > 0:
            events.append(TraceEvent(s, "dp", "param_sync", opt_end, end))
    out[s] = (clock, dp_end, end)
    yield env.timeout(max(end - env.now, 0.0))


def _grad_sync(s: int, stage: StageCost, last_backward: dict[int, tuple[float, float]],
               compute_end: float, overlap: bool, events: list[TraceEvent] | None) -> float:
    """Schedule stage s's gradient reduction on its DP stream; return when the stream is done.

    With overlap, chunk c's `layers` buckets become ready evenly over its last backward
    (the backward walks the layers in reverse, one bucket per layer); without overlap every
    chunk's reduction starts after the last backward.
    """
    dp = _Stream()
    work = []  # (ready_s, duration_s, name, args), in issue order
    if overlap:
        for c, (start, dur) in sorted(last_backward.items(), key=lambda kv: kv[1][0]):
            chunk = stage.chunks[c]
            n = max(chunk.layers, 1)
            for i in range(n):
                work.append((start + (i + 1) / n * dur, chunk.grad_sync_s / n,
                             f"grad_sync.c{c}.b{i}", {"chunk": c, "bucket": i}))
    else:
        for c, chunk in enumerate(stage.chunks):
            work.append((compute_end, chunk.grad_sync_s, f"grad_sync.c{c}", {"chunk": c}))
    for ready_s, duration_s, name, args in work:
        t0, t1 = dp.reserve(ready_s, duration_s)
        if events is not None and t1 > t0:
            events.append(TraceEvent(s, "dp", name, t0, t1, args))
    return dp.free_s


def _peak_inflight(ops: list[Op], chunks: list[ChunkCost]) -> tuple[float, int]:
    """Largest activation bytes and micro-batch count held at once (forward start to
    backward end), walking the stage's sequential op order."""
    held_bytes, held, peak_bytes, peak = 0.0, 0, 0.0, 0
    for kind, c, _ in ops:
        if kind == "F":
            held_bytes += chunks[c].activation_bytes
            held += 1
            peak_bytes = max(peak_bytes, held_bytes)
            peak = max(peak, held)
        else:
            held_bytes -= chunks[c].activation_bytes
            held -= 1
    return peak_bytes, peak


def _busy_parts(stage: StageCost, m: int) -> dict[str, float]:
    """Summed op parts: every chunk runs one forward and one backward per micro-batch."""
    total: Counter[str] = Counter()
    for chunk in stage.chunks:
        for cost in (chunk.forward, chunk.backward):
            for name, seconds in cost.parts.items():
                total[name] += m * seconds
    return dict(total)


def _validate(stages: list[StageCost], config: PipelineConfig) -> None:
    p, m, v = config.num_stages, config.num_microbatches, config.virtual_stages
    for field, value in (("num_stages", p), ("num_microbatches", m), ("virtual_stages", v)):
        if value < 1:
            raise SpecError(field, value, "must be >= 1")
    if config.p2p_s < 0:
        raise SpecError("p2p_s", config.p2p_s, "must be >= 0")
    if len(stages) != p:
        raise SpecError("stages", len(stages), f"need one StageCost per stage ({p})")
    for s, stage in enumerate(stages):
        if len(stage.chunks) != v:
            raise SpecError(f"stages[{s}].chunks", len(stage.chunks),
                            f"need one ChunkCost per virtual stage ({v})")


def simulate_pipeline(stages: list[StageCost], config: PipelineConfig,
                      record_events: bool = True) -> PipelineResult:
    """Simulate one iteration; `record_events=False` skips the trace (faster)."""
    _validate(stages, config)
    p, m, v = config.num_stages, config.num_microbatches, config.virtual_stages
    orders = [stage_ops(config.schedule, s, p, m, v) for s in range(p)]
    sim = _Sim(config, record_events)
    ends: dict[int, tuple[float, float, float]] = {}
    for s in range(p):
        plan = _plan(s, orders[s], stages[s], p, v)
        sim.env.process(_run_stage(sim, s, plan, stages[s], config, ends))
    sim.env.run()
    assert len(ends) == p, f"schedule deadlocked; stuck stages {sorted(set(range(p)) - set(ends))}"
    timelines = []
    for s, stage in enumerate(stages):
        compute_end, dp_end, end = ends[s]
        peak_bytes, peak = _peak_inflight(orders[s], stage.chunks)
        timelines.append(StageTimeline(
            end_s=end, compute_end_s=compute_end, busy_parts=_busy_parts(stage, m),
            dp_exposed_s=max(dp_end - compute_end, 0.0), optimizer_s=stage.optimizer_s,
            param_sync_s=stage.param_sync_s, peak_inflight_bytes=peak_bytes,
            peak_inflight_microbatches=peak))
    events = sim.events or []
    events.sort(key=lambda e: (e.start_s, e.stage, _STREAM_RANK[e.stream]))
    return PipelineResult(max(t.end_s for t in timelines), timelines, events)
