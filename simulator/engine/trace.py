"""Chrome trace output of a simulated iteration (open in chrome://tracing or ui.perfetto.dev).

Owns the mapping from `TraceEvent`s to the Trace Event Format: one process per pipeline
stage ("stage N"), one thread per stream ("compute", "p2p", "dp"), one complete ("X")
event per box, times in microseconds.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from simulator.engine.pipeline_api import TraceEvent

STREAM_TIDS = {"compute": 0, "p2p": 1, "dp": 2}


def _metadata(stages: list[int]) -> list[dict]:
    """Name and order the processes (stages) and threads (streams)."""
    meta = []
    for s in stages:
        meta.append({"name": "process_name", "ph": "M", "pid": s, "args": {"name": f"stage {s}"}})
        meta.append({"name": "process_sort_index", "ph": "M", "pid": s, "args": {"sort_index": s}})
        for stream, tid in STREAM_TIDS.items():
            meta.append({"name": "thread_name", "ph": "M", "pid": s, "tid": tid,
                         "args": {"name": stream}})
    return meta


def chrome_trace_dict(events: list[TraceEvent], process_name: str = "simtune") -> dict:
    """The trace as a JSON-ready dict; `process_name` labels the whole trace (otherData)."""
    boxes = [{
        "name": e.name, "cat": e.stream, "ph": "X", "pid": e.stage, "tid": STREAM_TIDS[e.stream],
        "ts": e.start_s * 1e6, "dur": (e.end_s - e.start_s) * 1e6, "args": e.args,
    } for e in events]
    stages = sorted({e.stage for e in events})
    return {"traceEvents": _metadata(stages) + boxes, "displayTimeUnit": "ms",
            "otherData": {"source": process_name}}


def write_chrome_trace(events: list[TraceEvent], path: str | os.PathLike,
                       process_name: str = "simtune") -> Path:
    """Write the trace to `path` atomically (temp file in the same folder, then rename)."""
    path = Path(path)
    trace = chrome_trace_dict(events, process_name)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(trace, f)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return path
