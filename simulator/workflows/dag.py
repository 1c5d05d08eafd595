"""The call DAG of a prompt program.

Each node is one LLM call: its prompt and output tokens, the calls it waited for, its
measured duration (when traced) and `gap_s`, the program's own time between the call's
inputs being ready and the call being issued (Python work, tool calls). Read from a trace of
`executor.prompts` with `dag_from_trace`, through the simulator's own trace reader
(`simulator.workflows.trace`): the simulator never imports the executor.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from simulator.errors import SpecError
from simulator.workflows.trace import read_trace

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
    trace = read_trace(path)
    done = {i: c for i, c in trace.calls.items() if c.finished}
    if not done:
        raise SpecError("trace", str(path), "has no finished call")
    nodes: dict[str, CallNode] = {}
    for i, c in sorted(done.items(), key=lambda kv: (kv[1].submitted, kv[0])):
        prompt_text = "\n".join(str(m.get("content", "")) for m in c.messages)
        deps = [d for d in c.deps if d in done]
        ready = max((done[d].ended for d in deps), default=0.0)
        nodes[i] = CallNode(i, _tokens(c.prompt_tokens, prompt_text), _tokens(c.completion_tokens, c.response or ""),
                            deps, max(0.0, c.submitted - ready), c.ended - (c.started or c.submitted),
                            c.submitted, c.ended, c.path)
    measured = max(c.ended for c in trace.calls.values() if c.ended is not None)
    return WorkflowDAG(nodes, measured, str(path))
