"""`simtune run train`: run a training plan on this machine (spawned ranks, or under torchrun)
and print what it measured, beside the simulator's prediction with `--compare`."""

from __future__ import annotations

import os
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from simtune.cli.apps import run_app
from simtune.cli.render import (
    ClusterOption,
    JsonFlag,
    ModelOption,
    ProfileOption,
    _table,
    err,
    fmt_gib,
    fmt_seconds,
    handles_errors,
    out,
    print_json,
)
from simtune.cli.train import _plan_summary
from simulator.specs.catalog import load_cluster, load_plan
from simulator.training.report import BREAKDOWN_KEYS


def _error(measured: float | None, predicted: float | None) -> str:
    if measured is None or not predicted:
        return ""
    return f"{measured / predicted - 1:+.1%}"


def _side_by_side(r: Any) -> Table:
    table = _table(None, "metric", "measured", "predicted", "error")
    peak = max(r.peak_memory_bytes) if r.peak_memory_bytes else None
    rows = [
        ("step time", r.step_time_s, r.predicted_step_time_s, fmt_seconds),
        ("tokens/s", r.tokens_per_s, r.predicted_tokens_per_s, lambda x: f"{x:,.0f}"),
        ("peak memory (GiB, largest rank)", peak, r.predicted_peak_memory_bytes, lambda x: fmt_gib(x, 3)),
    ]
    for name, measured, predicted, fmt in rows:
        table.add_row(name, "-" if measured is None else fmt(measured),
                      "-" if predicted is None else fmt(predicted), _error(measured, predicted))
    if r.dry_run:
        table.add_row("parameters", f"{r.parameters:,}", f"{r.predicted_parameters:,}", "")
    return table


def _breakdown(r: Any) -> Table:
    table = _table("predicted breakdown", "part", "time", "% of step")
    total = r.predicted_step_time_s or 0.0
    for key in [*BREAKDOWN_KEYS, *(k for k in r.predicted_breakdown if k not in BREAKDOWN_KEYS)]:
        seconds = r.predicted_breakdown.get(key, 0.0)
        if seconds:
            table.add_row(key, fmt_seconds(seconds), f"{seconds / total:.1%}" if total else "")
    return table


def _render(r: Any, plan_ref: str, profile: str | None) -> None:
    plan = load_plan(r.plan)
    what = "dry run of" if r.dry_run else f"{r.steps} timed steps (+{r.warmup} warm-up) of"
    out.print(f"{what} [bold]{escape(r.model)}[/] on [bold]{escape(r.cluster)}[/] "
              f"({r.degrees['world_size']} ranks, {r.device}, {r.backend or 'no backend'}, {r.dtype})")
    out.print(f"plan [bold]{escape(plan.name or plan_ref)}[/]: {escape(_plan_summary(plan))}")
    if r.cost_sources:
        used = profile or load_cluster(r.cluster).profile or "datasheet"
        sources = "; ".join(f"{k} from {v}" for k, v in r.cost_sources.items())
        out.print(escape(f"predicted with profile {used}: {sources}"), soft_wrap=True)
    out.print(_side_by_side(r))
    out.print(f"checkpointed layers per stage: {r.checkpointed_layers}; parameters: {r.parameters:,}")
    if r.losses:
        out.print("losses: " + ", ".join(f"{x:.4f}" for x in r.losses))
    if r.peak_memory_bytes:
        out.print(escape(f"peak memory per rank ({r.peak_memory_source}): "
                         + ", ".join(f"{fmt_gib(b, 3)} GiB" for b in r.peak_memory_bytes)), soft_wrap=True)
    if r.predicted_breakdown:
        out.print(_breakdown(r))


@run_app.command("train")
@handles_errors
def run_train(
    model: ModelOption,
    cluster: ClusterOption,
    plan: Annotated[str, typer.Option("--plan", "-p", help="Training plan: name or YAML path.")],
    steps: Annotated[int, typer.Option(min=1, help="Timed steps (after the warm-up).")] = 5,
    warmup: Annotated[int, typer.Option(min=0, help="Untimed steps first.")] = 2,
    profile: ProfileOption = None,
    compare: Annotated[bool, typer.Option("--compare", help="Also predict the step with the simulator.")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Check the plan on the meta device; run nothing.")] = False,
    dtype: Annotated[str, typer.Option(help="bf16 or fp32.")] = "bf16",
    as_json: JsonFlag = False,
) -> None:
    """Train the model with the plan on this machine's devices and measure each step."""
    from executor.training.run import run_training  # torch only for this command
    from profiler.ranks import RankError

    try:
        report = run_training(model, cluster, plan, steps=steps, warmup=warmup, dry_run=dry_run,
                              compare=compare, profile=profile, dtype=dtype)
    except (RankError, TimeoutError) as e:
        err.print(Text(f"error: {e}", style="bold red"), soft_wrap=True)
        raise typer.Exit(1) from None
    if os.environ.get("RANK", "0") != "0":
        return  # under torchrun every rank has the report; rank 0 prints it
    if as_json:
        print_json(report.to_dict())
        return
    _render(report, plan, profile)
