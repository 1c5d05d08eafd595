"""Plumbing every benchmark shares: timing, machine description, atomic output, markdown.

Each benchmark prints what it measured against a baseline measured in the same run, writes
its results as JSON (and a markdown table where the README quotes one) atomically, and can
regenerate the markdown from the JSON alone (`--markdown-only`).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import sympy

import simulator.files

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def timed(fn: Callable[[], object], reps: int) -> tuple[list[float], object]:
    """Wall-clock seconds of `reps` calls of fn (perf_counter), and the last call's result."""
    out, last = [], None
    for _ in range(reps):
        t0 = time.perf_counter()
        last = fn()
        out.append(time.perf_counter() - t0)
    return out, last


def machine_info() -> dict:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = None
    cpu_model = None
    if Path("/proc/cpuinfo").exists():
        names = [ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                 if ln.startswith("model name")]
        cpu_model = names[0] if names else None
    return {
        "processor": platform.processor(), "cpu_model": cpu_model, "machine": platform.machine(),
        "platform": platform.platform(), "cpu_count": os.cpu_count(),
        "python": sys.version.split()[0], "numpy": np.__version__, "sympy": sympy.__version__,
        "git_commit": commit,
    }


def cpu_times() -> dict[str, int] | None:
    """The machine's CPU time counters since boot, in clock ticks, summed over its cores: `busy`
    (user, nice, system, irq, softirq), `idle` (idle, iowait) and `steal` (time a virtual CPU
    was ready to run while the hypervisor ran someone else); None where /proc/stat is absent."""
    try:
        first = Path("/proc/stat").read_text().splitlines()[0].split()
    except OSError:
        return None
    if first[0] != "cpu" or len(first) < 9:
        return None
    user, nice, system, idle, iowait, irq, softirq, steal = (int(x) for x in first[1:9])
    return {"busy": user + nice + system + irq + softirq, "idle": idle + iowait, "steal": steal}


def stolen_share(before: dict[str, int] | None, after: dict[str, int] | None) -> float | None:
    """Of the CPU time the machine's cores wanted between two `cpu_times` readings, the share the
    hypervisor gave to other guests: steal / (busy + steal). On a shared virtual machine this is
    the slowdown no profile taken at another time can know of; None without readings or work."""
    if before is None or after is None:
        return None
    busy, steal = after["busy"] - before["busy"], after["steal"] - before["steal"]
    return steal / (busy + steal) if busy + steal > 0 else None


def run_fields(benchmark: str, quick: bool, repetitions: dict) -> dict:
    """The fields every result JSON opens with: what ran, when, how often, on what."""
    return {"benchmark": benchmark, "timestamp": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "quick": quick, "repetitions": repetitions, "machine": machine_info()}


def print_findings(flags: list[str]) -> None:
    print("\nlooks wrong / worth a look:" if flags else "\nnothing flagged")
    for f in flags:
        print(f"  - {f}")


def wait_healthy(proc: subprocess.Popen, port: int, timeout_s: float) -> str | None:
    """Poll a server child's http://127.0.0.1:port/health once a second until it answers 200.
    Returns None then, else why not: "exited with N" or "not healthy after T s"."""
    import httpx  # noqa: PLC0415 - only the serving benchmarks start servers

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return f"exited with {proc.returncode}"
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2.0).status_code == 200:
                return None
        except httpx.HTTPError:
            pass
        time.sleep(1.0)
    return f"not healthy after {timeout_s:.0f} s"


def write_text_atomic(text: str, path: Path) -> None:
    """Write to a temporary file beside `path`, then rename it over `path` (readable by all)."""
    simulator.files.write_text_atomic(path, text)


def md_escape(text: str) -> str:
    """Pipes inside a table cell (even in a code span) must be escaped in GitHub markdown."""
    return text.replace("|", "\\|")


def parser(description: str, quick_help: str, default_out: Path, markdown: bool = True) -> argparse.ArgumentParser:
    """The options every benchmark takes: --quick, --out, and (with a markdown table) --markdown-only."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help=quick_help)
    p.add_argument("--out", type=Path, default=default_out, help="JSON output path")
    if markdown:
        p.add_argument("--markdown-only", action="store_true", help="regenerate the .md from the JSON and exit")
    return p


def write_results(result: dict, out: Path, markdown: Callable[[dict], str] | None = None) -> None:
    """The JSON, and the markdown beside it (same name, .md) when the benchmark has one."""
    write_text_atomic(json.dumps(result, indent=2) + "\n", out)
    if markdown is None:
        print(f"wrote {out}")
        return
    md_path = out.with_suffix(".md")
    write_text_atomic(markdown(result), md_path)
    print(f"wrote {out} and {md_path}")


def rewrite_markdown(out: Path, markdown: Callable[[dict], str]) -> dict:
    """--markdown-only: the markdown regenerated from an existing JSON."""
    result = json.loads(out.read_text())
    md_path = out.with_suffix(".md")
    write_text_atomic(markdown(result), md_path)
    print(f"wrote {md_path}")
    return result
