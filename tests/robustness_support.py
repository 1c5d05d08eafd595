"""What the robustness tests share: the CLI called in-process under a time limit, and the
hypothesis strategies of odd values and mutated specs.

`run_cli(argv)` runs `simtune ARGV` in this process (no subprocess: the imports are paid once)
with its stdout and stderr captured, and returns the exit code. An exception that escapes the
command is *not* caught here: it is the traceback the user would see, so the test fails on it.
A call longer than its limit raises `Hang` (a BaseException, so no `except Exception` inside
the command can swallow it).
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import typer
import yaml
from hypothesis import settings
from hypothesis import strategies as st

from simulator.errors import SpecError


def examples(n: int) -> settings:
    """`n` examples under `make test`; under `make fuzz` (HYPOTHESIS_PROFILE=fuzz) the profile's many."""
    if os.environ.get("HYPOTHESIS_PROFILE", "simtune") == "simtune":
        return settings(max_examples=n)
    return settings()


class Hang(BaseException):
    """A call ran past its time limit."""


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise `Hang` in this (main) thread after `seconds` of wall-clock time."""

    def _alarm(signum: int, frame: Any) -> None:
        raise Hang(f"still running after {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@dataclass
class CliResult:
    code: int
    stdout: str
    stderr: str


_COMMAND = None


def run_cli(argv: list[str], timeout_s: float = 30.0) -> CliResult:
    """`simtune ARGV` in-process: its exit code and captured output (see the module docstring)."""
    global _COMMAND
    if _COMMAND is None:
        from simtune.cli import app

        _COMMAND = typer.main.get_command(app)
    stdout, stderr = io.StringIO(), io.StringIO()
    code: Any = 0
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr), time_limit(timeout_s):
        try:
            _COMMAND.main(args=[str(a) for a in argv], prog_name="simtune", standalone_mode=True)
        except SystemExit as e:
            code = e.code
    code = 0 if code is None else code
    return CliResult(int(code), stdout.getvalue(), stderr.getvalue())


def assert_report_or_named_error(r: CliResult, argv: list[str]) -> None:
    """The contract of every command on any input: a report (0), or `error: ...` and exit 2."""
    assert "Traceback" not in r.stderr, (argv, r.stderr)
    assert r.code in (0, 2), (argv, r.code, r.stdout[-2000:], r.stderr[-2000:])
    if r.code == 2:
        assert r.stderr.strip(), (argv, "exit 2 without a message")


def assert_named_spec_error(e: BaseException) -> None:
    """A loader's refusal: a SpecError (a ValueError) whose message names a field."""
    assert isinstance(e, SpecError), f"{type(e).__name__}: {e}"
    assert e.field and str(e).startswith(e.field), str(e)


# --- odd values --------------------------------------------------------------------------------

EXTREME_NUMBERS = [0, -1, 1, 2, 10**12, 10**30, -(10**12), 0.5, -0.5, 1e-300, 1e308,
                   math.nan, math.inf, -math.inf]

odd_scalars = st.one_of(
    st.sampled_from(EXTREME_NUMBERS),
    st.integers(min_value=-(10**15), max_value=10**15),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.none(),
    st.text(max_size=12),
    st.sampled_from(["", "inf", "nan", "1e999", "-1", "0x10", "yes", "gpt3-1.3b", "8xa100-80gb"]),
)
odd_values = st.one_of(
    odd_scalars,
    st.lists(odd_scalars, max_size=4),
    st.dictionaries(st.text(max_size=6), odd_scalars, max_size=3),
    st.just(list(range(10_000))),  # a huge list
)


def mutate(base: dict[str, Any], data: st.DataObject, depth: int = 0) -> dict[str, Any]:
    """`base` with one field dropped, one unknown field added, or one (nested) value replaced."""
    out = dict(base)
    how = data.draw(st.sampled_from(["drop", "extra", "replace", "replace", "replace", "nested"]))
    keys = sorted(out)
    if how == "drop" and keys:
        out.pop(data.draw(st.sampled_from(keys)))
    elif how == "extra":
        out[data.draw(st.text(min_size=1, max_size=10))] = data.draw(odd_values)
    elif how == "nested" and depth < 2:
        nested = [k for k in keys if isinstance(out[k], dict)]
        if nested:
            k = data.draw(st.sampled_from(nested))
            out[k] = mutate(out[k], data, depth + 1)
        elif keys:
            out[data.draw(st.sampled_from(keys))] = data.draw(odd_values)
    elif keys:
        out[data.draw(st.sampled_from(keys))] = data.draw(odd_values)
    return out


def dump_yaml(data: Any) -> str:
    """YAML of any drawn value (NaN and infinities as YAML's .nan/.inf)."""
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)


random_yaml_text = st.one_of(
    st.text(max_size=200),
    st.sampled_from(["", "---", "[1, 2", "{a: 1", "- - -", ": :", "a: [", "!!python/object:os.system ls",
                     "a: &x [*x]", "\x00", "key: \"unterminated", "num_layers: .inf", "- 1\n- 2"]),
    st.recursive(odd_scalars, lambda c: st.one_of(st.lists(c, max_size=3),
                                                  st.dictionaries(st.text(max_size=8), c, max_size=3)),
                 max_leaves=8).map(dump_yaml),
)
