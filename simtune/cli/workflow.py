"""`simtune simulate workflow` (speedup of a prompt program's parallel calls, predicted) and
`simtune trace show` (a prompt trace as a call tree and a timeline, or a Chrome trace)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.tree import Tree

from simtune.cli.apps import simulate_app
from simtune.cli.render import JsonFlag, _table, err, fmt_seconds, handles_errors, out, print_json
from simulator.files import write_text_atomic

trace_app = typer.Typer(help="Prompt-program traces: show them, export them.", no_args_is_help=True)

TraceArg = Annotated[Path, typer.Argument(help="A JSONL trace written by executor.prompts.")]


def _x(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _s(value: float | None) -> str:
    return "-" if value is None else fmt_seconds(value)


@simulate_app.command("workflow")
@handles_errors
def simulate_workflow(
    trace: TraceArg,
    model: Annotated[str | None, typer.Option("--model", "-m", help="Serving model for the replay.")] = None,
    cluster: Annotated[str | None, typer.Option("--cluster", "-c", help="Serving cluster.")] = None,
    deployment: Annotated[str | None, typer.Option("--deployment", "-d", help="Serving deployment.")] = None,
    as_json: JsonFlag = False,
) -> None:
    """Predict a prompt program's sequential and parallel makespan from its trace: Amdahl's
    estimate over stages, and (with --model --cluster --deployment) a replay on the serving model."""
    from simulator.workflows import dag_from_trace, predict_workflow

    dag = dag_from_trace(trace)
    p = predict_workflow(dag, model, cluster, deployment)
    if as_json:
        print_json(p.to_dict())
        return
    table = _table(f"{escape(str(trace))}: {p.calls} calls in {p.stages} stages", "", "sequential",
                   "parallel", "speedup")
    table.add_row("measured", "-", _s(p.measured_s), "-")
    table.add_row("Amdahl", _s(p.amdahl_sequential_s), _s(p.amdahl_parallel_s), _x(p.amdahl_speedup))
    if p.simulated_speedup is not None:
        table.add_row("replay", _s(p.simulated_sequential_s), _s(p.simulated_parallel_s), _x(p.simulated_speedup))
    out.print(table)
    out.print(f"Amdahl over stages uses {p.durations} call durations.")
    if p.simulated_speedup is not None:
        s = p.serving
        out.print(f"replay: the calls on {s['model']} / {s['cluster']} / {s['deployment']} "
                  f"(continuous batching, peak batch {p.simulated_peak_batch}).")


def _lanes(spans: list[tuple[float, float]]) -> list[int]:
    """Greedy lanes so that no two overlapping spans share one (for the timeline and Chrome)."""
    ends: list[float] = []
    lanes = []
    for start, end in spans:
        lane = next((k for k, e in enumerate(ends) if e <= start), len(ends))
        if lane == len(ends):
            ends.append(end)
        else:
            ends[lane] = end
        lanes.append(lane)
    return lanes


def chrome_events(t: Any) -> list[dict[str, Any]]:
    """Functions on one track, calls on lanes of another; times in microseconds."""
    events: list[dict[str, Any]] = [
        {"name": "process_name", "ph": "M", "pid": 1, "args": {"name": "prompt program"}},
        {"name": "process_name", "ph": "M", "pid": 2, "args": {"name": "LLM calls"}},
    ]
    funcs = sorted(t.functions.values(), key=lambda f: f.start)
    for f in funcs:
        if f.end is not None:
            events.append({"name": f.path.rsplit("/", 1)[-1], "ph": "X", "pid": 1, "tid": 0,
                           "ts": f.start * 1e6, "dur": (f.end - f.start) * 1e6, "args": {"path": f.path}})
    calls = sorted((c for c in t.calls.values() if c.ended is not None), key=lambda c: c.started or c.submitted)
    spans = [(c.started if c.started is not None else c.submitted, c.ended) for c in calls]
    for c, (start, end), lane in zip(calls, spans, _lanes(spans)):
        events.append({"name": c.path.rsplit("/", 2)[-2] if "/" in c.path else c.id, "ph": "X", "pid": 2,
                       "tid": lane, "ts": start * 1e6, "dur": (end - start) * 1e6,
                       "args": {"id": c.id, "path": c.path, "deps": c.deps, "prompt_tokens": c.prompt_tokens,
                                "completion_tokens": c.completion_tokens, "error": c.error,
                                "waited_s": start - c.submitted}})
    for tool in t.tools:
        events.append({"name": f"tool {tool['name']}", "ph": "X", "pid": 1, "tid": 1, "ts": tool["start"] * 1e6,
                       "dur": (tool["end"] - tool["start"]) * 1e6, "args": {"arguments": tool.get("arguments")}})
    return events


def _timeline(t: Any, width: int = 60) -> list[str]:
    calls = sorted((c for c in t.calls.values() if c.ended is not None), key=lambda c: c.submitted)
    end = max([c.ended for c in calls], default=0.0) or 1.0
    rows = []
    for c in calls:
        start = c.started if c.started is not None else c.submitted
        a, b = int(start / end * width), max(int(start / end * width) + 1, int(c.ended / end * width))
        bar = " " * a + "█" * (b - a)
        rows.append(f"{c.id:>5} {bar:<{width}} {fmt_seconds(c.ended - start)}")
    return rows


@trace_app.command("show")
@handles_errors
def trace_show(
    trace: TraceArg,
    chrome: Annotated[Path | None, typer.Option(help="Also write a Chrome trace (JSON) here.")] = None,
    as_json: JsonFlag = False,
) -> None:
    """The call tree (functions and their LLM calls) and a timeline of the calls."""
    from executor.prompts.trace import read_trace

    t = read_trace(trace)
    if chrome is not None:
        write_text_atomic(chrome, json.dumps({"traceEvents": chrome_events(t)}))
        err.print(f"Chrome trace written to {escape(str(chrome))} (open it in https://ui.perfetto.dev)")
    if as_json:
        print_json({"run": t.run, "truncated": t.truncated, "measured_s": t.measured_s,
                    "functions": [vars(f) for f in t.functions.values()],
                    "calls": [vars(c) for c in t.calls.values()], "tools": t.tools})
        return
    root = Tree(f"[bold]{escape(str(trace))}[/] ({escape(str(t.run.get('backend', '')))} backend, "
                f"{len(t.calls)} calls, {_s(t.measured_s)})")
    nodes: dict[str | None, Tree] = {"f0": root, None: root}
    for f in sorted(t.functions.values(), key=lambda f: f.start):
        parent = nodes.get(f.parent, root)
        nodes[f.id] = parent.add(f"{escape(f.name)} [dim]{_s((f.end or f.start) - f.start)}[/]")
    for c in sorted(t.calls.values(), key=lambda c: c.submitted):
        state = (f"[red]{escape(c.error)}[/]" if c.error else
                 "[yellow]unfinished[/]" if c.ended is None else
                 f"{c.prompt_tokens or '?'} -> {c.completion_tokens or '?'} tokens, "
                 f"{_s(c.duration)}" + (f", waited {_s((c.started or c.submitted) - c.submitted)}"
                                        if c.started and c.started - c.submitted > 1e-3 else ""))
        reply = (c.response or "").strip().replace("\n", " ")
        nodes.get(c.function, root).add(f"[cyan]{c.id}[/] gen {state}: {escape(reply[:60])}")
    out.print(root)
    if t.truncated:
        err.print("note: the trace's last line was cut short (the run crashed while writing it)")
    out.print("timeline (calls, from issue to answer):")
    for row in _timeline(t):
        out.print(row, markup=False, highlight=False)
