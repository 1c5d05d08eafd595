"""Reading the trace of a prompt program (`executor.prompts.trace` writes it): JSON lines merged
into a `Trace` of calls, functions and tools, tolerating a last line cut short by a crash.

The reader lives in the simulator, which never imports the executor: the replay and the
workflow DAG (`simulator.workflows.dag`) read traces through it, and so does the executor's
own tooling (`simtune trace show`). The record types are documented where they are written.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from simulator.errors import SpecError


@dataclass
class CallRecord:
    id: str
    function: str | None
    path: str
    key: str
    messages: list[dict[str, str]]
    params: dict[str, Any]
    deps: list[str]
    submitted: float
    started: float | None = None
    ended: float | None = None
    response: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    backend: str | None = None
    simulated: bool = False
    error: str | None = None

    @property
    def finished(self) -> bool:
        return self.ended is not None and self.error is None

    @property
    def duration(self) -> float | None:
        return None if self.ended is None or self.started is None else self.ended - self.started


@dataclass
class FunctionRecord:
    id: str
    parent: str | None
    name: str
    path: str
    start: float
    end: float | None = None


@dataclass
class Trace:
    path: Path
    run: dict[str, Any]
    calls: dict[str, CallRecord]
    functions: dict[str, FunctionRecord]
    tools: list[dict[str, Any]]
    truncated: bool = False  # the last line was cut short (a crash mid-write)

    @property
    def measured_s(self) -> float | None:
        """Wall time from the run's start to its last recorded event."""
        ends = [c.ended for c in self.calls.values() if c.ended is not None]
        ends += [f.end for f in self.functions.values() if f.end is not None]
        return max(ends) if ends else None


def read_trace(path: str | Path) -> Trace:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"trace {path}: no such file")
    run: dict[str, Any] = {}
    calls: dict[str, CallRecord] = {}
    functions: dict[str, FunctionRecord] = {}
    tools: list[dict[str, Any]] = []
    truncated = False
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise SpecError(f"trace {path}", f"byte {err.start}", "is not a text (UTF-8) file") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except (json.JSONDecodeError, RecursionError):
            if number == len(lines):
                truncated = True  # a crash mid-line: keep what came before
                continue
            raise SpecError(f"trace {path}, line {number}", line[:80], "is not JSON") from None
        try:
            run = _record(rec, run, calls, functions, tools)
        except (KeyError, TypeError, AttributeError, ValueError) as err:
            raise SpecError(f"trace {path}, line {number}", line[:80],
                            f"is not a prompt-trace record ({type(err).__name__}: {err})") from None
    if not run:
        raise SpecError(f"trace {path}", "line 1", "has no run record: not a simtune prompt trace")
    return Trace(path, run, calls, functions, tools, truncated)


def _record(rec: Any, run: dict[str, Any], calls: dict[str, CallRecord], functions: dict[str, FunctionRecord],
            tools: list[dict[str, Any]]) -> dict[str, Any]:
    """Add one JSON record of a trace to what was read so far; returns the run record."""
    if not isinstance(rec, dict):
        raise TypeError(f"a record is a JSON object, not {type(rec).__name__}")
    for key in ("start", "end", "submitted", "started", "ended"):
        value = rec.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not math.isfinite(value)):
            raise ValueError(f"{key} must be a finite number of seconds, not {value!r}")
    kind = rec.get("type")
    if kind == "run":
        run = rec
    elif kind == "function":
        functions[rec["id"]] = FunctionRecord(rec["id"], rec.get("parent"), rec["name"], rec["path"],
                                              rec["start"])
    elif kind == "function_end" and rec["id"] in functions:
        functions[rec["id"]].end = rec["end"]
    elif kind == "call_start":
        calls[rec["id"]] = CallRecord(rec["id"], rec.get("function"), rec["path"], rec["key"],
                                      rec["messages"], rec.get("params", {}), rec.get("deps", []),
                                      rec["submitted"])
    elif kind == "call" and rec["id"] in calls:
        c = calls[rec["id"]]
        for name in ("started", "ended", "response", "prompt_tokens", "completion_tokens",
                     "backend", "error"):
            setattr(c, name, rec.get(name))
        c.tool_calls = rec.get("tool_calls") or []
        c.simulated = bool(rec.get("simulated"))
    elif kind == "tool":
        tools.append(rec)
    return run
