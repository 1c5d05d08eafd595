"""What a serving run records: steps by kind, KV utilization over time, transitions, trace."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from simulator.engine.pipeline_api import TraceEvent

MAX_TIMELINE_POINTS = 4000  # KV samples kept (every n-th step beyond this)


@dataclass
class Recorder:
    trace: bool = False
    events: list[TraceEvent] = field(default_factory=list)
    steps: Counter = field(default_factory=Counter)
    kv_timeline: list[tuple[float, float]] = field(default_factory=list)
    transitions: int = 0
    transition_time_s: float = 0.0
    _samples: int = 0

    def step(self, replica: int, kind: str, start_s: float, end_s: float, seqs: int, tokens: int,
             kv_utilization: float) -> None:
        self.steps[kind] += 1
        self._samples += 1
        stride = 1 + self._samples // MAX_TIMELINE_POINTS
        if replica == 0 and self._samples % stride == 0:
            self.kv_timeline.append((end_s, kv_utilization))
        if self.trace:
            self.events.append(TraceEvent(replica, "compute", kind, start_s, end_s,
                                          {"sequences": seqs, "tokens": tokens, "kv_utilization": round(kv_utilization, 4)}))

    def box(self, replica: int, stream: str, name: str, start_s: float, end_s: float, **args) -> None:
        if self.trace and end_s > start_s:
            self.events.append(TraceEvent(replica, stream, name, start_s, end_s, args))

    def transition(self, replica: int, name: str, start_s: float, end_s: float, **args) -> None:
        self.transitions += 1
        self.transition_time_s += end_s - start_s
        self.box(replica, "compute", name, start_s, end_s, **args)

    def stats(self) -> dict:
        return {"steps": dict(self.steps), "kv_timeline": self.kv_timeline, "transitions": self.transitions,
                "transition_time_s": self.transition_time_s}
