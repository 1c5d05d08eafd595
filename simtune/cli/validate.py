"""`simtune validate train|serve`: predicted vs published measurements, one table per group,
the cited sources, and a summary; `--strict` exits 1 when a group misses its target."""

from __future__ import annotations

import math
from typing import Any

import typer
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from simtune.cli.apps import validate_app
from simtune.cli.render import (
    EXIT_CHECK_FAILED,
    JsonFlag,
    ProfileOption,
    StrictFlag,
    _table,
    err,
    fmt_number,
    handles_errors,
    out,
    print_json,
)


def _quantity(row: dict[str, Any]) -> str:
    quantity, unit = str(row.get("quantity", "")), row.get("unit")
    return f"{quantity} ({unit})" if unit and unit not in quantity else quantity


def _error_cell(error: Any, target: float | None) -> Text:
    if not isinstance(error, (int, float)):
        return Text("n/a")
    missed = target is not None and abs(error) > target
    return Text(f"{error:+.1%}", style="red" if missed else "")


def _validation_tables(rows: list[dict[str, Any]], summary: dict[str, dict[str, Any]]
                       ) -> tuple[list[Table], list[str]]:
    """One predicted-vs-measured table per group, and the cited sources they point to."""
    sources = list(dict.fromkeys(str(r.get("source", "")) for r in rows))
    groups = list(dict.fromkeys(r.get("group", "rows") for r in rows))
    tables = []
    for group in groups:
        target = summary.get(group, {}).get("target", math.inf)
        table = _table(f"{group}: predicted vs measured", "row", "quantity", "predicted",
                       "measured", "error", "src", numeric_from=2)
        table.columns[1].justify = "left"
        for r in (r for r in rows if r.get("group", "rows") == group):
            ref = sources.index(str(r.get("source", ""))) + 1
            table.add_row(escape(str(r.get("id", r.get("name", "")))), escape(_quantity(r)),
                          fmt_number(r.get("predicted")), fmt_number(r.get("measured")),
                          _error_cell(r.get("error"), target), escape(f"[{ref}]"))
        tables.append(table)
    return tables, sources


def _validation_notes(rows: list[dict[str, Any]], group: str) -> list[str]:
    """One line per row of `group` that carries a note (what the model assumes for it)."""
    return [f"  {escape(str(r.get('id', '')))}: {escape(str(r['note']))}"
            for r in rows if r.get("group", "rows") == group and r.get("note")]


def _verdict(passed: bool | None) -> Text:
    if passed is None:
        return Text("-")  # a group without a target is reported, never judged
    return Text("PASS", style="green") if passed else Text("FAIL", style="bold red")


def _validation_summary_table(summary: dict[str, dict[str, Any]], error_key: str,
                              error_header: str) -> Table:
    """n, the group's error statistic (`error_key`, e.g. mae), max, target and verdict."""
    table = _table("summary", "group", "n", error_header, "max", "target", "result")
    for group, s in summary.items():
        worst = f"{s['max']:.1%}" if "max" in s else ""
        target = "-" if s.get("target") is None else f"≤ {s['target']:.0%}"
        table.add_row(escape(group), str(s.get("n", "")), f"{s[error_key]:.1%}", worst, target,
                      _verdict(s.get("passed")))
    return table


def report_validation(result: Any, as_json: bool, strict: bool, error_key: str,
                      error_header: str, profile: str | None = None) -> None:
    """Print a ValidationResult (tables or JSON); with `strict`, exit 1 if a group failed."""
    if profile is not None:
        measured = sum(r.get("costs", "datasheet") != "datasheet" for r in result.rows)
        err.print(f"profile {escape(profile)}: {measured} of {len(result.rows)} rows are on the device it measured "
                  "and use its costs; the others use the datasheet")
    if as_json:
        print_json(result.to_dict())
    else:
        tables, sources = _validation_tables(result.rows, result.summary)
        groups = list(dict.fromkeys(r.get("group", "rows") for r in result.rows))
        for group, table in zip(groups, tables):
            out.print(table)
            for note in _validation_notes(result.rows, group):
                out.print(note)
        for i, source in enumerate(sources, 1):
            out.print(f"\\[{i}] {escape(source)}")
        out.print(_validation_summary_table(result.summary, error_key, error_header))
    failed = [g for g, s in result.summary.items() if s.get("passed") is False]
    if strict and failed:
        err.print(Text(f"failed: {', '.join(failed)}", style="bold red"))
        raise typer.Exit(EXIT_CHECK_FAILED)


@validate_app.command("train")
@handles_errors
def validate_train(as_json: JsonFlag = False, strict: StrictFlag = False, profile: ProfileOption = None) -> None:
    """Predict the published training measurements and report the errors per group.

    With --profile, rows on the kind of device the profile measured use its costs."""
    # Imported here so that the other commands never depend on the validation data.
    from simulator.training.validation import validate_training

    err.print("validating training predictions against published measurements ...")
    report_validation(validate_training(profile=profile), as_json, strict, "mae", "MAE", profile)


@validate_app.command("serve")
@handles_errors
def validate_serve(as_json: JsonFlag = False, strict: StrictFlag = False, profile: ProfileOption = None) -> None:
    """Predict the published serving measurements (throughput, TTFT, TPOT) per group.

    With --profile, rows on the kind of device the profile measured use its costs."""
    from simulator.serving.validation import validate_serving

    err.print("validating serving predictions against published measurements ...")
    report_validation(validate_serving(profile=profile), as_json, strict, "median_abs_error", "median abs error",
                      profile)
