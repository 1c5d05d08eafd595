"""Every `simtune` command the README shows in a console block runs, and none ends in a traceback.

The commands are read from README.md itself, so the documentation and the tool cannot drift
apart. Output paths (`--out`, `--plot`, `--trace`, `--chrome`) are redirected into a temporary folder;
`simtune profile` measuring commands run with each op family's sweep cut to its first
shapes (the command path is the same, only the sweep is shorter). A command may fail on
purpose (the README shows input errors): then it must exit 2 with an `error:` line.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from profiler_stubs import cut_sweeps
from typer.testing import CliRunner

from simtune.cli import app

ROOT = Path(__file__).resolve().parents[1]
OUTPUT_OPTIONS = {"--out", "--plot", "--trace", "--chrome"}
SHAPES_PER_OP = 3


def readme_commands() -> list[str]:
    """`$ simtune ...` lines of the README's console blocks, continuation lines joined."""
    commands, in_console = [], False
    lines = iter((ROOT / "README.md").read_text().splitlines())
    for line in lines:
        if line.startswith("```"):
            in_console = line.strip() == "```console"
            continue
        if in_console and line.startswith("$ ") and re.match(r"\$ (\S*/)?simtune\b", line):
            command = line[2:]
            while command.rstrip().endswith("\\"):
                command = command.rstrip()[:-1] + " " + next(lines).strip()
            commands.append(command.split("  #")[0].split(" # ")[0].strip())
    return commands


COMMANDS = readme_commands()


def test_the_readme_shows_commands():
    assert len(COMMANDS) >= 5, COMMANDS
    assert any(c.split()[1:2] == ["profile"] for c in COMMANDS)


@pytest.fixture
def tiny_sweeps(monkeypatch):
    """Cut every profiler sweep to its first shapes (a measuring command then takes seconds)."""
    import profiler.run

    cut_sweeps(monkeypatch, SHAPES_PER_OP)
    monkeypatch.setattr(profiler.run, "MIN_ROWS_TO_FIT", 2)


def redirect_outputs(args: list[str], tmp: Path, outputs: dict[str, Path]) -> list[str]:
    """Point output options into `tmp`; the same README path maps to the same temporary path."""
    out = list(args)
    for i, arg in enumerate(out[:-1]):
        if arg in OUTPUT_OPTIONS:
            outputs.setdefault(out[i + 1], tmp / f"out{len(outputs)}{Path(out[i + 1]).suffix}")
            out[i + 1] = str(outputs[out[i + 1]])
        elif arg == "--report" and out[i + 1] in outputs:
            out[i + 1] = str(outputs[out[i + 1]])
    return out


def test_every_readme_command_runs_without_a_traceback(tmp_path, monkeypatch, tiny_sweeps):
    monkeypatch.chdir(ROOT)
    runner = CliRunner()
    outputs: dict[str, Path] = {}
    for command in COMMANDS:
        args = redirect_outputs(shlex.split(command)[1:], tmp_path, outputs)
        result = runner.invoke(app, args)
        text = f"$ {command}\nexit {result.exit_code}\n{result.stdout}\n{result.stderr}"
        assert "Traceback" not in result.stdout + result.stderr, text
        assert result.exception is None or isinstance(result.exception, SystemExit), (
            f"{text}\n{type(result.exception).__name__}: {result.exception}")
        assert result.exit_code in (0, 2), text
        if result.exit_code == 2:
            assert "error:" in result.stderr, text
