"""The call DAG of a prompt program.

Each node is one LLM call: its prompt and output tokens, the calls it waited for, its
measured duration (when traced) and `gap_s`, the program's own time between the call's
inputs being ready and the call being issued (Python work, tool calls). Read from a trace of
`executor.prompts` with `dag_from_trace`; the simulator never imports the executor, so the
trace is read as plain JSON lines here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from simulator.errors import SpecError

CHARS_PER_TOKEN = 4  # for a call traced without token counts (a rough English average)


@dataclass
class CallNode:
    id: str
    prompt_tokens: int
    output_tokens: int
    deps: list[str] = field(default_factory=list)
    gap_s: float = 0.0
    measured_s: float | None = None  # the call's own duration in the trace
    submitted_s: float | None = None
    ended_s: float | None = None
    path: str = ""


@dataclass
class WorkflowDAG:
    calls: dict[str, CallNode]
    measured_s: float | None = None  # the traced run's wall time
    source: str = ""

    def __post_init__(self):
        for c in self.calls.values():
            missing = [d for d in c.deps if d not in self.calls]
            if missing:
                raise SpecError(f"calls.{c.id}.deps", missing, "must name calls of the workflow")
        self.order()  # refuses cycles

    def order(self) -> list[str]:
        """Call ids, every call after its dependencies (Kahn's algorithm)."""
        indegree = {i: len(c.deps) for i, c in self.calls.items()}
        users: dict[str, list[str]] = {i: [] for i in self.calls}
        for i, c in self.calls.items():
            for d in c.deps:
                users[d].append(i)
        ready = sorted((i for i, n in indegree.items() if n == 0), key=self._submit_key)
        out: list[str] = []
        while ready:
            i = ready.pop(0)
            out.append(i)
            for u in users[i]:
                indegree[u] -= 1
                if indegree[u] == 0:
                    ready.append(u)
            ready.sort(key=self._submit_key)
        if len(out) != len(self.calls):
            raise SpecError("calls", sorted(set(self.calls) - set(out)), "dependencies form a cycle")
        return out

    def _submit_key(self, i: str) -> tuple[float, str]:
        c = self.calls[i]
        return (c.submitted_s if c.submitted_s is not None else 0.0, i)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> WorkflowDAG:
        """A hand-written DAG: {"calls": [{"id", "prompt_tokens", "output_tokens", "deps"}]}."""
        try:
            nodes = {c["id"]: CallNode(c["id"], int(c["prompt_tokens"]), int(c["output_tokens"]),
                                       list(c.get("deps", [])), float(c.get("gap_s", 0.0)))
                     for c in data["calls"]}
        except (KeyError, TypeError, ValueError) as err:
            raise SpecError("workflow.calls", str(err), "each call needs id, prompt_tokens, output_tokens "
                            "and optional deps, gap_s") from None
        return cls(nodes, data.get("measured_s"), "dict")


def _tokens(count: Any, text: str) -> int:
    if isinstance(count, int) and count > 0:
        return count
    return max(1, len(text) // CHARS_PER_TOKEN)


def dag_from_trace(path: str | Path) -> WorkflowDAG:
    """The DAG of the finished calls in a trace written by `executor.prompts`."""
    path = Path(path)
    if not path.exists():
        raise SpecError("trace", str(path), "no such file")
    try:
        return _dag(path)
    except (KeyError, TypeError, AttributeError, ValueError) as err:
        if isinstance(err, SpecError):
            raise
        raise SpecError("trace", str(path), f"is not a prompt trace: a record misses a field or has the wrong "
                        f"type ({type(err).__name__}: {err})") from None


def _dag(path: Path) -> WorkflowDAG:
    starts: dict[str, dict[str, Any]] = {}
    ends: dict[str, dict[str, Any]] = {}
    run_seen = False
    lines = path.read_text(encoding="utf-8").splitlines()  # UnicodeDecodeError: a ValueError
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except (json.JSONDecodeError, RecursionError):
            if n == len(lines):
                continue  # a crash cut the last line short
            raise SpecError("trace", f"{path}:{n}", "is not JSON lines") from None
        if not isinstance(rec, dict):
            raise SpecError("trace", f"{path}:{n}", f"a record is a JSON object, not {type(rec).__name__}")
        kind = rec.get("type")
        run_seen |= kind == "run"
        if kind == "call_start":
            starts[rec["id"]] = rec
        elif kind == "call":
            ends[rec["id"]] = rec
    if not run_seen:
        raise SpecError("trace", str(path), "has no run record: not a simtune prompt trace")
    done = {i for i, e in ends.items() if i in starts and not e.get("error") and e.get("ended") is not None}
    if not done:
        raise SpecError("trace", str(path), "has no finished call")
    nodes: dict[str, CallNode] = {}
    for i in sorted(done, key=lambda i: (starts[i]["submitted"], i)):
        s, e = starts[i], ends[i]
        prompt_text = "\n".join(m.get("content", "") for m in s["messages"])
        deps = [d for d in s.get("deps", []) if d in done]
        ready = max((ends[d]["ended"] for d in deps), default=0.0)
        nodes[i] = CallNode(i, _tokens(e.get("prompt_tokens"), prompt_text),
                            _tokens(e.get("completion_tokens"), e.get("response") or ""), deps,
                            max(0.0, s["submitted"] - ready), e["ended"] - (e.get("started") or s["submitted"]),
                            s["submitted"], e["ended"], s.get("path", ""))
    measured = max(e["ended"] for e in ends.values() if e.get("ended") is not None)
    return WorkflowDAG(nodes, measured, str(path))
