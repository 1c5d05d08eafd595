"""`simtune simulate serve` and `simtune tune serve`: one serving run, and the search for the
best static and re-sharding deployments (with `--emit`, the static winner's launch files)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

from simtune.cli.apps import simulate_app, tune_app
from simtune.cli.render import (
    ClusterOption,
    JsonFlag,
    ModelOption,
    ProfileOption,
    SearchProgress,
    _arrival,
    _engines,
    _table,
    _tokens,
    costs_line,
    err,
    fmt_seconds,
    handles_errors,
    out,
    print_json,
    print_written,
)
from simulator.specs.catalog import load_cluster, load_deployment, load_model, load_workload

# --- simulate serve ------------------------------------------------------------------------


class ServingProgress:
    """The `progress(simulated_s, done, total)` callback of `simulate_serving` as a transient bar
    on stderr: requests done, simulated time, and the time left. Drawn only on a terminal and
    never with --json (`enabled=False`), so stdout stays one JSON object."""

    def __init__(self, enabled: bool = True) -> None:
        self.bar = Progress(SpinnerColumn(), "{task.description}", BarColumn(), MofNCompleteColumn(),
                            "requests", TextColumn("simulated {task.fields[simulated]}"),
                            TimeElapsedColumn(), TimeRemainingColumn(), console=err, transient=True)
        self.live = enabled and err.is_terminal
        self.task = self.bar.add_task("serving", total=None, simulated="0 s")

    def __enter__(self) -> ServingProgress:
        if self.live:
            self.bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar.live.is_started:
            self.bar.stop()

    def __call__(self, simulated_s: float, done: int, total: int) -> None:
        self.bar.update(self.task, completed=done, total=total, simulated=fmt_seconds(simulated_s))


def _deployment_summary(d: Any) -> str:
    layout = (f"prefill {d.prefill.describe()} → decode {d.decode.describe()} (re-sharding)"
              if d.resharding else f"{d.prefill.describe()} (static)")
    parts = [f"dp {d.dp}", layout, f"scheduler {d.scheduler}"]
    if d.cpu_kv_buffer_GB:
        parts.append(f"CPU KV {d.cpu_kv_buffer_GB:g} GB")
    return " · ".join(parts)


def _workload_summary(w: Any) -> str:
    return " · ".join([f"{w.num_requests:,} requests", _arrival(w.arrival), _tokens(w)])


def _ms(p: dict[str, float]) -> str:
    """p50 / p90 / p99 of a latency in seconds, shown in ms."""
    values = [p.get(k, math.nan) for k in ("p50", "p90", "p99")]
    return " / ".join(f"{v * 1e3:,.2f}" if math.isfinite(v) else "n/a" for v in values)


def _serving_table(r: Any) -> Table:
    table = _table(None, "metric", "value")
    table.add_row("output tokens/s", f"{r.output_tokens_per_s:,.1f}")
    table.add_row("total tokens/s", f"{r.total_tokens_per_s:,.1f}")
    table.add_row("requests/s", f"{r.requests_per_s:,.3f}")
    table.add_row("makespan", fmt_seconds(r.makespan_s))
    table.add_row("TTFT p50 / p90 / p99 (ms)", _ms(r.ttft_s))
    table.add_row("TPOT p50 / p90 / p99 (ms)", _ms(r.tpot_s))
    table.add_row("preemptions", f"{r.preemptions:,}")
    transitions = f"{r.transitions:,} ({fmt_seconds(r.transition_time_s)})" if r.transitions else "0"
    table.add_row("transitions (time in them)", transitions)
    table.add_row("KV utilization mean / max", f"{r.kv_utilization['mean']:.1%} / "
                  f"{r.kv_utilization['max']:.1%}")
    table.add_row("steps", " · ".join(f"{k} {n:,}" for k, n in r.steps.items()) or "0")
    if r.speculation:
        s = r.speculation
        acc = "-" if s["acceptance_rate"] is None else f"{s['acceptance_rate']:.2f}"
        table.add_row(f"speculation ({s['policy']}, draft {s['draft']})",
                      f"mean k {s['mean_k']:.2f} · acceptance {acc}")
    if r.prefix_cache:
        c = r.prefix_cache
        share = c["cached_prompt_tokens"] / c["prompt_tokens"] if c["prompt_tokens"] else 0.0
        table.add_row("prompt tokens from the prefix cache", f"{c['cached_prompt_tokens']:,} of {c['prompt_tokens']:,} "
                      f"({share:.0%}) · {c['evictions']:,} evictions")
    return table


@simulate_app.command("serve")
@handles_errors
def simulate_serve(
    model: ModelOption,
    cluster: ClusterOption,
    deployment: Annotated[str, typer.Option("--deployment", "-d",
                                            help="Serving deployment: name or YAML path.")],
    workload: Annotated[str, typer.Option("--workload", "-w",
                                          help="Serving workload: name or YAML path.")],
    as_json: JsonFlag = False,
    trace: Annotated[Path | None, typer.Option(help="Write a Chrome trace (JSON) here.")] = None,
    profile: ProfileOption = None,
    exact_steps: Annotated[bool, typer.Option(
        "--exact-steps", help="Simulate every engine step as its own event (no fast-forward through "
        "runs of identical decode steps); same results, slower: for debugging.")] = False,
) -> None:
    """Predict serving a workload: throughput, TTFT/TPOT percentiles, KV use, transitions."""
    from simulator.serving.simulate import simulate_serving

    model_spec, cluster_spec = load_model(model), load_cluster(cluster, profile)
    dep_spec, wl_spec = load_deployment(deployment), load_workload(workload)
    with ServingProgress(enabled=not as_json) as progress:
        report = simulate_serving(model_spec, cluster_spec, dep_spec, wl_spec, trace_path=trace,
                                  exact_steps=exact_steps, progress=progress if progress.live else None)
    if trace is not None:
        err.print(f"trace written to {escape(str(trace))} (open it in https://ui.perfetto.dev)")
    if as_json:
        print_json(report.to_dict())
        return
    out.print(f"[bold]{escape(model_spec.name)}[/] on [bold]{escape(cluster_spec.name)}[/] "
              f"({cluster_spec.num_devices} x {escape(cluster_spec.device.name)})")
    out.print(f"deployment [bold]{escape(dep_spec.name or deployment)}[/]: "
              f"{escape(_deployment_summary(dep_spec))}", soft_wrap=True)
    out.print(f"workload [bold]{escape(wl_spec.name or workload)}[/]: "
              f"{escape(_workload_summary(wl_spec))}", soft_wrap=True)  # paths stay whole
    out.print(escape(costs_line(cluster_spec.device)), soft_wrap=True)
    out.print(_serving_table(report))


# --- tune serve ---------------------------------------------------------------------------

def _deployment_short(d: Any) -> str:
    def lay(p: Any) -> str:
        return f"tp{p.tp}pp{p.pp}"

    layout = f"{lay(d.prefill)}→{lay(d.decode)}" if d.resharding else lay(d.prefill)
    return f"dp{d.dp} {layout} {d.scheduler}"


def _serving_comparison_table(result: Any) -> Table:
    table = _table("static vs re-sharding", "", "deployment", "output tok/s", "TTFT p50 ms",
                   "trans.", "vs static", numeric_from=2)
    static = result.static.report.output_tokens_per_s if result.static else None
    for family, best in (("static", result.static), ("re-sharding", result.resharding)):
        if best is None:
            table.add_row(family, "nothing fits", "-", "-", "-", "-")
            continue
        r = best.report
        ratio = f"{r.output_tokens_per_s / static:.2f}x" if static else "-"
        table.add_row(family, _deployment_short(best.deployment), f"{r.output_tokens_per_s:,.1f}",
                      f"{r.ttft_s['p50'] * 1e3:,.1f}", f"{r.transitions:,}", ratio)
    return table


@tune_app.command("serve")
@handles_errors
def tune_serve(
    model: ModelOption,
    cluster: ClusterOption,
    workload: Annotated[str, typer.Option("--workload", "-w", help="Serving workload: name or YAML path.")],
    as_json: JsonFlag = False,
    emit: Annotated[str | None, typer.Option(
        metavar="ENGINES", help="Write launch commands of the static winner: vllm, sglang.")] = None,
    out_dir: Annotated[Path, typer.Option("--out", help="Folder for --emit.")] = Path("simtune-launch"),
    screen_requests: Annotated[int, typer.Option(min=1, help="Requests each candidate is screened on.")] = 300,
    profile: ProfileOption = None,
) -> None:
    """Find the best static deployment and the best re-sharding one, and their ratio."""
    from executor.launch.serving import ENGINES, emit_serving_configs
    from tuner.serving import tune_serving

    engines = _engines(emit, ENGINES)
    model_spec, cluster_spec, wl_spec = load_model(model), load_cluster(cluster, profile), load_workload(workload)
    with SearchProgress() as progress:
        result = tune_serving(model_spec, cluster_spec, wl_spec, screen_requests=screen_requests,
                              progress=progress)
    if engines and result.static:
        print_written(emit_serving_configs(model_spec, cluster_spec, result.static.deployment, engines, out_dir))
    if as_json:
        print_json(result.to_dict())
        return
    out.print(f"[bold]{escape(model_spec.name)}[/] on [bold]{escape(cluster_spec.name)}[/] "
              f"({cluster_spec.num_devices} x {escape(cluster_spec.device.name)}); workload "
              f"{escape(_workload_summary(wl_spec))}", soft_wrap=True)
    out.print(escape(costs_line(cluster_spec.device)), soft_wrap=True)
    out.print(_serving_comparison_table(result))
    s = result.search
    out.print(f"searched {s['evaluated']:,} deployments ({s['infeasible']:,} pruned) in {s['seconds']:.1f} s, "
              f"each screened on {s['screen_requests']:,} requests")
    for p in result.pruned[:5]:
        out.print(Text(f"pruned {p['deployment']}: {p['reason']}", style="dim"), soft_wrap=True)
