"""The trace of a prompt program: one JSON object per line, written as the run goes.

Each line is flushed when written, so a run that crashes keeps every line it reached. Times
are seconds since the run started (`t0` in the `run` line, epoch seconds). Record types:

- `run`: `version`, `t0`, `backend`, `program`.
- `function`: a prompt-function invocation, `id` ("f3"), `parent` (its caller's id or null),
  `name`, `path` (e.g. "main/solve[0]/branch[4]": names with per-caller counters), `start`;
  `function_end`: `id`, `end`.
- `call_start`: an LLM call was issued: `id` ("c7"), `function`, `path` (".../gen[2]": the
  strict replay key), `key` (a hash of messages and parameters: the loose replay key),
  `messages`, `params`, `deps` (ids of the calls it waited for: futures in its prompt, and
  results the program read before issuing it), `submitted`.
- `call`: the call ended: `id`, `started` (sent to the backend), `ended`, `response`,
  `prompt_tokens`, `completion_tokens`, `tool_calls`, `backend`, `simulated`, `error`.
- `tool`: a tool ran: `id`, `function`, `name`, `arguments`, `result`, `error`, `start`, `end`.

`read_trace(path)` (simulator/workflows/trace.py, re-exported here) merges them into `Trace`
(calls by id, functions, tools), tolerating a last line cut short by a crash.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from pathlib import Path
from typing import Any

from simulator.workflows.trace import CallRecord, FunctionRecord, Trace, read_trace

VERSION = 1
__all__ = ["CallRecord", "FunctionRecord", "Trace", "TraceWriter", "VERSION", "call_key", "read_trace"]


def call_key(messages: list[dict[str, str]], params: dict[str, Any]) -> str:
    """The loose replay key: what was asked, not where in the program."""
    blob = json.dumps({"messages": messages, "params": params}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


class TraceWriter:
    """Appends records to a JSONL file, one flushed line each (thread-safe)."""

    def __init__(self, path: str | Path, backend: str = "", program: str = ""):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.t0 = time.time()
        self._clock0 = time.perf_counter()
        self._lock = threading.Lock()
        self._file = self.path.open("w", encoding="utf-8")
        self.write({"type": "run", "version": VERSION, "t0": self.t0, "backend": backend,
                    "program": program})

    def now(self) -> float:
        return time.perf_counter() - self._clock0

    def write(self, record: dict[str, Any]) -> None:
        line = json.dumps(record, default=str, ensure_ascii=False)
        with self._lock:
            if self._file.closed:
                return
            self._file.write(line + "\n")
            self._file.flush()

    def close(self) -> None:
        with self._lock:
            self._file.close()


