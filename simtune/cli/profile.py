"""`simtune profile`: measure this machine's device into a profile directory, or report on one."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TimeElapsedColumn
from rich.table import Table

from simtune.cli.render import (
    JsonFlag,
    _int_list,
    _table,
    err,
    handles_errors,
    out,
    print_json,
    write_figure,
)
from simulator.errors import SpecError


class ProfileProgress:
    """`profiler.run.Progress` as one bar per op family on stderr (drawn only on a terminal)."""

    def __init__(self) -> None:
        self.bar = Progress(SpinnerColumn(), "{task.description:<12}", BarColumn(), MofNCompleteColumn(),
                            TimeElapsedColumn(), console=err)
        self.tasks: dict[str, Any] = {}

    def __enter__(self) -> ProfileProgress:
        if err.is_terminal:
            self.bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.bar.stop()

    def start(self, totals: dict[str, int]) -> None:
        for op, total in totals.items():
            self.tasks[op] = self.bar.add_task(op, total=total)
            if not total:
                err.print(f"{op}: already measured, skipped")

    def advance(self, op: str) -> None:
        self.bar.advance(self.tasks[op])


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def _params(fit: dict[str, Any]) -> str:
    return ", ".join(f"{k} {_fmt(v)}" for k, v in fit.items() if k not in ("cv_median_abs_error", "samples"))


def _error(fit: dict[str, Any]) -> str:
    error = fit.get("cv_median_abs_error")
    return "-" if error is None else f"{error:.1%}"


def _report_table(report: dict[str, Any]) -> Table:
    table = _table("fits, cross-validated over held-out shapes", "op", "part", "median |error|", "samples",
                   "parameters (SI units)", numeric_from=2)
    table.columns[1].no_wrap = True
    table.columns[-1].no_wrap, table.columns[-1].justify, table.columns[-1].overflow = False, "left", "fold"
    for op, fit in report["fits"].items():
        top = {k: v for k, v in fit.items() if k != "parts"}
        table.add_row(op, "all", _error(top), _fmt(top.get("samples")), escape(_params(top)))
        for name, part in fit.get("parts", {}).items():
            if name.count(".") < 2:  # per dtype, per op, per collective; --json has every level
                table.add_row("", name, _error(part), _fmt(part.get("samples")), escape(_params(part)))
    return table


@handles_errors
def profile(
    device: Annotated[str, typer.Option(help="What to measure: cpu, cuda or cuda:<index>.")] = "cpu",
    ops: Annotated[str, typer.Option(
        help="Op families, comma-separated: gemm, attention, memory, copies, collectives, decode, gnn (or all).")] = "all",
    out_dir: Annotated[Path | None, typer.Option("--out", help="Profile directory to write (or resume).")] = None,
    ranks: Annotated[str, typer.Option(
        help="Rank counts for collectives and the gnn lock-step rows, comma-separated (each >= 2).")] = "2",
    threads: Annotated[int | None, typer.Option(
        min=1, help="Threads per process (default: 1 on cpu, a rank being one core).")] = None,
    quick: Annotated[bool, typer.Option("--quick", help="Fewer, smaller shapes (about 2 minutes on a CPU).")] = False,
    report: Annotated[Path | None, typer.Option(
        "--report", metavar="DIR", help="Print the fits of an existing profile instead of measuring.")] = None,
    plot: Annotated[Path | None, typer.Option(
        help="With --report: save measured efficiency vs the datasheet roofline here (PNG/SVG/PDF).")] = None,
    as_json: JsonFlag = False,
) -> None:
    """Measure kernels, copies, collectives and decode steps on this machine, or report a profile."""
    if report is not None:
        _report(report, as_json, plot)
        return
    if out_dir is None:
        raise SpecError("--out", None, "name the profile directory to write (or --report DIR to read one)")
    from profiler.run import parse_ops, run_profile  # noqa: PLC0415 - torch only for this command

    with ProfileProgress() as progress:
        root = run_profile(out_dir, device=device, ops=parse_ops(ops), ranks=_int_list(ranks, "--ranks"),
                           quick=quick, threads=threads, progress=progress)
    err.print(f"profile written to {escape(str(root))}")
    _report(root, as_json, plot)


def _report(root: Path, as_json: bool, plot: Path | None) -> None:
    from profiler.report import fit_report, plot_efficiency  # noqa: PLC0415

    result = fit_report(root)
    if plot is not None:
        write_figure(plot_efficiency(root), plot)
        err.print(f"efficiency plot written to {escape(str(plot))}")
    if as_json:
        print_json(result)
        return
    d = result["device"]
    out.print(f"[bold]{escape(str(d.get('name')))}[/] ({d.get('kind')}, {d.get('threads')} threads, torch "
              f"{d.get('torch')}), measured {escape(str(d.get('date')))} on {escape(str(d.get('host')))}; "
              f"compared with the datasheet of {escape(str(result['datasheet_device']))}", soft_wrap=True)
    out.print(_report_table(result))

