"""What a serving run records: steps by kind, KV utilization over time, transitions, trace.

Steps arrive one at a time (`step`) or as a run of decode steps computed at once (`steps`).
The KV timeline keeps replica 0's utilization after each step, every n-th step once the run
has more than `MAX_TIMELINE_POINTS` steps, n growing with the number of steps of every
replica so far. That count is taken from the step end times when the stats are read, not in
the order the replicas report their steps, so a replica that reports a run of steps late
leaves the same timeline (same-time steps of different replicas count replica 0's first).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from simulator.engine.pipeline_api import TraceEvent

MAX_TIMELINE_POINTS = 4000  # KV samples kept (every n-th step beyond this)


@dataclass
class Recorder:
    trace: bool = False
    events: list[TraceEvent] = field(default_factory=list)
    steps: Counter = field(default_factory=Counter)
    transitions: int = 0
    transition_time_s: float = 0.0
    _ends: dict[int, list[float]] = field(default_factory=dict)  # replica -> its step end times
    _kv: list[float] = field(default_factory=list)               # replica 0's utilization after each step

    def step(self, replica: int, kind: str, start_s: float, end_s: float, seqs: int, tokens: int,
             kv_utilization: float) -> None:
        self.steps[kind] += 1
        self._ends.setdefault(replica, []).append(end_s)
        if replica == 0:
            self._kv.append(kv_utilization)
        if self.trace:
            self.events.append(TraceEvent(replica, "compute", kind, start_s, end_s,
                                          {"sequences": seqs, "tokens": tokens, "kv_utilization": round(kv_utilization, 4)}))

    def steps_run(self, replica: int, kind: str, times_s: list[float] | np.ndarray, seqs: int, tokens: int,
                  kv_utilization: list[float] | np.ndarray, boxes=None) -> None:
        """A run of len(times_s) - 1 steps of one kind back to back (step j from times_s[j]
        to times_s[j + 1]); `boxes(j)` gives step j's other boxes (swap, draft) for the trace,
        in the order a single step records them."""
        n = len(times_s) - 1
        self.steps[kind] += n
        ts = times_s if isinstance(times_s, list) else np.asarray(times_s).tolist()
        kv = kv_utilization if isinstance(kv_utilization, list) else np.asarray(kv_utilization, dtype=float).tolist()
        self._ends.setdefault(replica, []).extend(ts[1:])
        if replica == 0:
            self._kv.extend(kv)
        if self.trace:
            for j in range(n):
                for stream, name, start, end in (boxes(j) if boxes else ()):
                    self.box(replica, stream, name, start, end)
                self.events.append(TraceEvent(replica, "compute", kind, ts[j], ts[j + 1],
                                              {"sequences": seqs, "tokens": tokens, "kv_utilization": round(kv[j], 4)}))

    def box(self, replica: int, stream: str, name: str, start_s: float, end_s: float, **args) -> None:
        if self.trace and end_s > start_s:
            self.events.append(TraceEvent(replica, stream, name, start_s, end_s, args))

    def transition(self, replica: int, name: str, start_s: float, end_s: float, **args) -> None:
        self.transitions += 1
        self.transition_time_s += end_s - start_s
        self.box(replica, "compute", name, start_s, end_s, **args)

    def kv_timeline(self) -> list[tuple[float, float]]:
        """(end time, utilization) of replica 0's sampled steps."""
        ends = {r: np.asarray(e, dtype=float) for r, e in self._ends.items()}
        mine = ends.get(0, np.zeros(0))
        if not mine.size:
            return []
        util = np.asarray(self._kv, dtype=float)
        count = np.arange(1, mine.size + 1)  # steps of every replica so far, this one included
        for r, other in ends.items():
            if r != 0:
                count += np.searchsorted(other, mine, side="left")
        keep = count % (1 + count // MAX_TIMELINE_POINTS) == 0
        return list(zip(mine[keep].tolist(), util[keep].tolist()))

    def stats(self) -> dict:
        return {"steps": dict(self.steps), "kv_timeline": self.kv_timeline(), "transitions": self.transitions,
                "transition_time_s": self.transition_time_s}

    def trace_events(self) -> list[TraceEvent]:
        """The trace, replica by replica, each replica's boxes in the order it recorded them."""
        return sorted(self.events, key=lambda e: e.stage)
