"""What every command shares: input-error handling, JSON output, number formats, tables,
option types, the search progress bar, figures, and one-line summaries of specs.

Human output goes to `out` (stdout, never used when `--json` is given); notes and errors go
to `err` (stderr). Input errors (`SpecError`, `InfeasiblePlan`, a missing, unreadable or unwritable file, a full
disk) print `error: ...` and exit 2, like click's own usage errors, so scripts can tell them from a
failed `--strict` check (1).
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, NoReturn, TypeVar

import numpy as np
import typer
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from simulator.errors import InfeasiblePlan, SpecError
from simulator.files import atomic_path

GiB = 2**30
EXIT_INPUT_ERROR = 2
EXIT_CHECK_FAILED = 1

out = Console(highlight=False)              # tables; never used when --json is given
err = Console(stderr=True, highlight=False)  # notes and errors

JsonFlag = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")]
ModelOption = Annotated[str, typer.Option("--model", "-m", help="Model: catalog name or YAML path.")]
ClusterOption = Annotated[str, typer.Option("--cluster", "-c", help="Cluster: name, NxNODE or YAML.")]
ProfileOption = Annotated[str | None, typer.Option(
    "--profile", metavar="DIR",
    help="Measured profile (directory from `simtune profile`, or catalog name) whose costs replace the "
    "datasheet's; 'none' forces the datasheet. Default: the cluster's own profile, if it names one.")]
StrictFlag = Annotated[
    bool, typer.Option("--strict", help="Exit 1 if any group with a target misses it.")
]
F = TypeVar("F", bound=Callable[..., Any])


# --- errors and JSON -------------------------------------------------------------------------


@contextmanager
def input_errors() -> Iterator[None]:
    """Turn the user's input errors into `error: ...` on stderr and exit code 2 (no traceback)."""
    try:
        yield
    except (SpecError, InfeasiblePlan) as e:
        _fail(str(e))
    except FileNotFoundError as e:
        _fail(f"{e.strerror or 'file not found'}: {e.filename}" if e.filename else str(e))
    except OSError as e:  # an unwritable or unreadable path, a full disk: the writers leave no partial file
        _fail(f"{e.strerror or e}: {e.filename}" if e.filename else f"{e.strerror or e}")
    except MemoryError:
        _fail("out of memory: the inputs ask for more than this machine holds")


def _fail(message: str) -> NoReturn:
    err.print(Text(f"error: {message}", style="bold red"), soft_wrap=True)
    raise typer.Exit(EXIT_INPUT_ERROR)


def handles_errors(fn: F) -> F:
    """Decorator form of `input_errors` for commands (typer reads the wrapped signature)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with input_errors():
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def to_jsonable(obj: Any) -> Any:
    """Plain JSON data: numpy scalars/arrays unwrapped, non-finite floats as null."""
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return to_jsonable(obj.item())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None  # strict JSON has no NaN/Infinity
    if isinstance(obj, (Path, Enum)):
        return str(obj.value if isinstance(obj, Enum) else obj)
    return obj


def print_json(obj: Any) -> None:
    """The one JSON object a `--json` command prints on stdout."""
    typer.echo(json.dumps(to_jsonable(obj), indent=2, allow_nan=False))


# --- numbers and tables ----------------------------------------------------------------------


def fmt_seconds(s: float) -> str:
    """A duration with a unit that keeps 3-4 significant digits."""
    if not math.isfinite(s):
        return str(s)
    if s == 0.0:
        return "0"
    if abs(s) >= 1.0:
        return f"{s:.3f} s"
    if abs(s) >= 1e-3:
        return f"{s * 1e3:.3f} ms"
    return f"{s * 1e6:.1f} µs"


def fmt_gib(nbytes: float, digits: int = 2, sep: str = ",") -> str:
    return f"{nbytes / GiB:{sep}.{digits}f}"


def fmt_number(x: Any) -> str:
    """A measured or predicted value of any magnitude; non-numbers as they are."""
    if isinstance(x, bool) or not isinstance(x, (int, float, np.number)):
        return escape(str(x))
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    return f"{x:.4g}"


def _table(title: str | None, *headers: str, numeric_from: int = 1) -> Table:
    """A compact table; columns from `numeric_from` on are right-aligned, the first never wraps."""
    table = Table(title=title, title_justify="left", title_style="bold", box=box.SIMPLE_HEAD,
                  show_edge=False, collapse_padding=True)
    for i, h in enumerate(headers):
        numeric = i >= numeric_from
        table.add_column(h, justify="right" if numeric else "left", no_wrap=numeric or i == 0)
    return table


# --- spec summaries (catalog rows and command headers) ---------------------------------------


def _schedule(p: Any) -> str:
    return f"{p.schedule} (v={p.virtual_stages})" if p.schedule == "interleaved" else p.schedule


def _arrival(arrival: Any) -> str:
    """`offline`, or `poisson 2/s`."""
    if arrival.kind_ == "poisson":
        return f"poisson {arrival.rate_per_s:g}/s"
    return arrival.kind_


def _lengths(dist: Any) -> str:
    if dist.distribution == "fixed":
        return str(dist.value)
    if dist.distribution == "uniform":
        return f"uniform {dist.min}-{dist.max}"
    return f"lognormal mean {dist.mean:g} σ {dist.sigma:g}"


def _tokens(w: Any) -> str:
    """Where a workload's lengths come from: its preset, its trace, or in/out distributions."""
    if w.preset:
        return w.preset
    if w.trace:
        return f"trace {w.trace}"
    return f"in {_lengths(w.input_tokens)} / out {_lengths(w.output_tokens)}"


# --- long-running searches and their outputs -------------------------------------------------


class SearchProgress:
    """The `progress(stage, done, total)` callback of `tune_training` as a transient bar on stderr.

    One row per stage. Drawn only on a terminal: elsewhere rich would leave an empty line behind.
    """

    def __init__(self) -> None:
        self.bar = Progress(SpinnerColumn(), "{task.description}", BarColumn(),
                            MofNCompleteColumn(), TimeElapsedColumn(), console=err, transient=True)
        self.rows: dict[str, Any] = {}

    def __enter__(self) -> SearchProgress:
        if err.is_terminal:
            self.bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar.live.is_started:
            self.bar.stop()

    def __call__(self, stage: str, done: int, total: int) -> None:
        if stage not in self.rows:
            self.rows[stage] = self.bar.add_task(stage, total=total)
        self.bar.update(self.rows[stage], completed=done, total=total)


def _engines(emit: str | None, allowed: tuple[str, ...]) -> list[str]:
    """The engine names of `--emit a,b`, checked before the search so a typo costs no time."""
    from executor.launch.base import engine_names

    return engine_names([e.strip() for e in (emit or "").split(",") if e.strip()], allowed)


def print_written(files: list[Any]) -> None:
    """`wrote PATH` for each launch file, then each engine's approximations once, on stderr."""
    for f in files:
        err.print(f"wrote {escape(str(f.path))}")
    for engine, sentence in dict.fromkeys((f.engine, s) for f in files for s in f.approximations):
        err.print(Text(f"warning: {engine}: {sentence}", style="yellow"), soft_wrap=True)


def write_figure(fig: Any, path: Path) -> None:
    """Save a matplotlib figure atomically (a temporary file beside it, then os.replace); PNG
    unless the name's suffix says otherwise."""
    fmt = Path(path).suffix[1:].lower() or "png"
    formats = fig.canvas.get_supported_filetypes()
    if fmt not in formats:
        raise SpecError("plot", str(path), f"a figure's name ends in one of .{', .'.join(sorted(formats))}")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, bbox_inches="tight", format=fmt)


def _int_list(text: str, option: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise SpecError(option, text, "must be comma-separated integers, e.g. 1,2,4,8") from None
    if not values or min(values) < 1:
        raise SpecError(option, text, "needs at least one batch size, each >= 1")
    return values


def costs_line(device: Any) -> str:
    """One line saying where the device's costs came from, grouped by source."""
    by_source: dict[str, list[str]] = {}
    for cost, source in device.sources().items():
        by_source.setdefault(source, []).append(cost)
    return "costs: " + "; ".join(f"{', '.join(costs)} from {source}" for source, costs in by_source.items())
