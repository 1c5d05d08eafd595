"""Shared by the launch-file tests: run a generated script for real against stub programs.

Each stub is a tiny bash script on a private PATH; the logging stubs write the arguments
bash actually passed them, one per line, so a test checks flags as the engine would read them.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

BASH = shutil.which("bash")
needs_bash = pytest.mark.skipif(BASH is None, reason="needs bash")
LOG = "__log__"  # a stub body of LOG records its arguments


def run_with_stubs(script: Path, tmp_path: Path, stubs: dict[str, str], args: tuple[str, ...] = (),
                   unset: tuple[str, ...] = (), env: dict[str, str] | None = None) -> list[str]:
    """Run `script` with `stubs` (name -> bash body, or LOG) first on PATH and the variables in
    `unset` removed; return the arguments the logging stub received."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    log = tmp_path / "calls.txt"
    for name, body in stubs.items():
        body = f'printf "%s\\n" "$@" > "{log}"' if body == LOG else body
        (bin_dir / name).write_text(f"#!/usr/bin/env bash\n{body}\n")
        (bin_dir / name).chmod(0o755)
    environ = {k: v for k, v in os.environ.items() if k not in unset}
    environ.update(env or {}, PATH=f"{bin_dir}:{environ['PATH']}")
    subprocess.run([BASH, str(script), *args], check=True, env=environ, cwd=script.parent, timeout=30)
    return log.read_text().splitlines()


def flags(args: list[str]) -> dict[str, str | bool]:
    """`--flag value` pairs and bare `--switch`es, as argparse would read them."""
    out: dict[str, str | bool] = {}
    for i, a in enumerate(args):
        if a.startswith("--"):
            nxt = args[i + 1] if i + 1 < len(args) else None
            out[a] = nxt if nxt is not None and not nxt.startswith("--") else True
    return out


def assert_written_atomically(files: dict, out: Path, expected: set[str], shell: set[str]) -> None:
    """Exactly the expected files, no temporary ones left, each as rendered, scripts executable."""
    assert set(files) == expected
    assert {p.name for p in out.iterdir()} == expected  # no temporary files left behind
    for name, f in files.items():
        assert f.path == out / name and f.path.read_text() == f.text
        assert (f.path.stat().st_mode & 0o777) == (0o755 if name in shell else 0o644)
