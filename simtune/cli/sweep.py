"""`simtune sweep SPEC.yaml`: many scenarios of one command into one Parquet table, and
`simtune sweep --report DIR`: the best scenario per group and the Pareto front of time vs cost."""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from simtune.cli import app
from simtune.cli.render import (
    JsonFlag,
    SearchProgress,
    _table,
    err,
    fmt_number,
    handles_errors,
    out,
    print_json,
    write_figure,
)
from simulator.errors import SpecError


class SweepProgress(SearchProgress):
    """Scenarios done, scenarios/s and the time left, as a transient bar on stderr (terminal only;
    never with --json: the command then passes no progress at all)."""

    def __init__(self) -> None:
        self.bar = Progress(TextColumn("sweep"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("{task.fields[rate]} scenarios/s"), TimeRemainingColumn(),
                            console=err, transient=True)
        self.task = self.bar.add_task("sweep", total=None, rate="-")
        self.start = time.perf_counter()

    def __call__(self, done: int, total: int) -> None:  # type: ignore[override]
        elapsed = time.perf_counter() - self.start
        rate = f"{done / elapsed:,.1f}" if done and elapsed > 0 else "-"
        self.bar.update(self.task, completed=done, total=total, rate=rate)


def _rows(df: Any, spec: Any, columns: list[str], limit: int | None = None) -> list[dict[str, Any]]:
    keep = ["scenario_id", *spec.axes, *[c for c in columns if c in df]]
    return [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()}
            for r in df[keep].head(limit).to_dict("records")]


def _header(column: str) -> str:
    """`report.cost_per_million_tokens_usd` -> `$/M tokens`: narrow enough for a terminal."""
    short = column.removeprefix("report.").replace("cost_per_million_", "$/M ").removesuffix("_usd")
    return short.replace("cost_per_", "$/").replace("_", " ")


def _rank_table(title: str, rows: list[dict[str, Any]], spec: Any, columns: list[str]) -> Table:
    axes = [a for a, values in spec.axes.items() if len(values) > 1] or list(spec.axes)  # constants add nothing
    table = _table(title, *axes, *map(_header, columns), numeric_from=len(axes))
    for r in rows:
        table.add_row(*(escape(str(r[a])) for a in axes),
                      *(fmt_number(r.get(c)) if r.get(c) is not None else "-" for c in columns))
    return table


def _columns(spec: Any) -> list[str]:
    return [c for c in (spec.cmd.time_column, spec.cmd.cost_column) if c]


def _run(spec_path: Path, out_dir: Path | None, workers: int | None, ray: str | None, resume: bool,
         as_json: bool, rank_by: str, top: int) -> None:
    from tuner.sweep import load_sweep, run_sweep
    from tuner.sweep.analysis import ranked

    spec = load_sweep(spec_path)
    out_dir = out_dir or Path(f"{spec_path.stem}-sweep")
    if ray is not None:
        import importlib.util

        if importlib.util.find_spec("ray") is None:  # not imported: tuner.sweep sets Ray's environment first
            raise SpecError("--ray", ray, "needs Ray: pip install 'simtune[ray]'")
    with nullcontext() if as_json else SweepProgress() as progress:
        result = run_sweep(spec, out_dir, workers=workers, ray=ray, resume=resume, progress=progress)
    import pandas as pd

    df = pd.read_parquet(result.table_path) if result.table_path.exists() else pd.DataFrame({"status": []})
    best = _rows(ranked(df, spec, rank_by), spec, _columns(spec), top) if spec.cmd.time_column and len(df) else []
    if as_json:
        print_json({**result.to_dict(), "rank_by": rank_by, "best": best})
        return
    counts = _table(f"{spec.command}: {result.scenarios:,} scenarios ({result.skipped:,} done before)",
                    "status", "scenarios")
    for status, n in result.status.items():
        counts.add_row(status, f"{n:,}")
    out.print(counts)
    out.print(f"ran {result.ran:,} in {result.seconds:.1f} s ({result.scenarios_per_s:,.1f} scenarios/s) on "
              f"{escape(result.backend)}; table: {escape(str(result.table_path))}")
    if best:
        out.print(_rank_table(f"best {len(best)} by {rank_by}", best, spec, _columns(spec)))


def _report(out_dir: Path, plot: Path | None, as_json: bool, rank_by: str, group_by: str | None,
            heatmap: str | None) -> None:
    from tuner.sweep import read_sweep
    from tuner.sweep.analysis import best_per_group, metric, pareto_front, plot_front, plot_heatmap

    if not (out_dir / "results.parquet").exists():
        raise SpecError("--report", str(out_dir), "holds no results.parquet (run `simtune sweep SPEC --out DIR`)")
    spec, df = read_sweep(out_dir)
    axes = list(spec.axes)
    group = [g.strip() for g in group_by.split(",")] if group_by else axes[:1]
    cols = _columns(spec)
    best = _rows(best_per_group(df, spec, group, rank_by), spec, cols)
    front = _rows(pareto_front(df, metric(spec, "time"), metric(spec, "cost")), spec, cols)
    if plot is not None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        x, y = (heatmap.split(",") + [""])[:2] if heatmap else (axes + axes)[:2][::-1]
        fig, (left, right) = plt.subplots(1, 2, figsize=(14, 5))
        plot_front(df, spec, ax=left)
        plot_heatmap(df, x.strip(), y.strip(), metric(spec, rank_by), ax=right)
        write_figure(fig, plot)
        err.print(f"wrote {escape(str(plot))}")
    counts = df["status"].value_counts().to_dict()
    if as_json:
        print_json({"rank_by": rank_by, "group_by": group, "status": counts, "best_per_group": best,
                    "pareto_front": front})
        return
    out.print(" · ".join(f"{k} {v:,}" for k, v in counts.items()))
    out.print(_rank_table(f"best per {', '.join(group)} (by {rank_by})", best, spec, cols))
    out.print(_rank_table(f"Pareto front: {cols[0]} vs {cols[-1]}", front, spec, cols))


@app.command("sweep")
@handles_errors
def sweep(
    spec: Annotated[Path | None, typer.Argument(help="Sweep spec (YAML): command, options, axes, where.")] = None,
    out_dir: Annotated[Path | None, typer.Option("--out", help="Folder of the table (default: SPEC-sweep).")] = None,
    workers: Annotated[int | None, typer.Option(min=1, help="Processes (default: CPU count); 1: this one.")] = None,
    ray: Annotated[str | None, typer.Option(
        "--ray", metavar="ADDRESS|auto|cluster", help="Run on Ray: a cluster's head address (host:port), 'auto' "
        "for a local one started for the run, 'cluster' for the one this machine belongs to.")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Keep the table in --out; run what is missing.")] = False,
    rank_by: Annotated[str, typer.Option(help="time | cost")] = "time",
    top: Annotated[int, typer.Option(min=0, help="Best scenarios listed after a run.")] = 5,
    report: Annotated[Path | None, typer.Option(
        "--report", metavar="DIR", help="Summarise a sweep folder instead of running one.")] = None,
    plot: Annotated[Path | None, typer.Option(help="With --report: the Pareto front and a heat map (PNG).")] = None,
    group_by: Annotated[str | None, typer.Option(help="With --report: axes, comma-separated (default: the first).")]
    = None,
    heatmap: Annotated[str | None, typer.Option(
        metavar="X,Y", help="With --plot: the heat map's axes (default: the second and first).")] = None,
    as_json: JsonFlag = False,
) -> None:
    """Run a what-if sweep (a cross product of scenarios) into a Parquet table, or report on one."""
    from tuner.sweep.analysis import RANK_BY

    if rank_by not in RANK_BY:
        raise SpecError("--rank-by", rank_by, f"must be one of {', '.join(RANK_BY)}")
    if report is not None:
        if spec is not None:
            raise SpecError("--report", str(report), "give a spec to run or --report DIR, not both")
        _report(report, plot, as_json, rank_by, group_by, heatmap)
    elif spec is None:
        raise SpecError("SPEC", None, "give a sweep spec to run, or --report DIR")
    else:
        _run(spec, out_dir, workers, ray, resume, as_json, rank_by, top)
