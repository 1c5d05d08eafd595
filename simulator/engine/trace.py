"""Chrome trace output of a simulated iteration (open in chrome://tracing or ui.perfetto.dev).

Owns the mapping from `TraceEvent`s to the Trace Event Format: one process per pipeline
stage ("stage N", or another label such as "replica N"), one thread per stream ("compute",
"p2p", "dp", or any other stream name), one complete ("X") event per box, times in
microseconds.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from simulator.engine.pipeline_api import TraceEvent
from simulator.files import write_text_atomic

STREAM_TIDS = {"compute": 0, "p2p": 1, "dp": 2}


def _tids(events: list[TraceEvent]) -> dict[str, int]:
    """Thread ids: the known streams first, then others in order of appearance."""
    tids = dict(STREAM_TIDS)
    for e in events:
        tids.setdefault(e.stream, len(tids))
    return tids


def _metadata(stages: list[int], tids: dict[str, int], label: str) -> list[dict]:
    """Name and order the processes (stages) and threads (streams)."""
    meta = []
    for s in stages:
        meta.append({"name": "process_name", "ph": "M", "pid": s, "args": {"name": f"{label} {s}"}})
        meta.append({"name": "process_sort_index", "ph": "M", "pid": s, "args": {"sort_index": s}})
        for stream, tid in tids.items():
            meta.append({"name": "thread_name", "ph": "M", "pid": s, "tid": tid,
                         "args": {"name": stream}})
    return meta


def chrome_trace_dict(events: list[TraceEvent], process_name: str = "simtune",
                      process_label: str = "stage") -> dict:
    """The trace as a JSON-ready dict; `process_name` labels the whole trace (otherData)."""
    tids = _tids(events)
    boxes = [{
        "name": e.name, "cat": e.stream, "ph": "X", "pid": e.stage, "tid": tids[e.stream],
        "ts": e.start_s * 1e6, "dur": (e.end_s - e.start_s) * 1e6, "args": e.args,
    } for e in events]
    stages = sorted({e.stage for e in events})
    return {"traceEvents": _metadata(stages, tids, process_label) + boxes, "displayTimeUnit": "ms",
            "otherData": {"source": process_name}}


def write_chrome_trace(events: list[TraceEvent], path: str | os.PathLike,
                       process_name: str = "simtune", process_label: str = "stage") -> Path:
    """Write the trace to `path` atomically (temp file in the same folder, then rename)."""
    path = Path(path)
    trace = chrome_trace_dict(events, process_name, process_label)
    write_text_atomic(path, json.dumps(trace))
    return path
