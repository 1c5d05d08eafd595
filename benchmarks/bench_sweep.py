"""Benchmark the sweep runner: a 2,000-scenario `simulate train` sweep, three ways.

(a) serially in this process (`--workers 1`): the baseline, measured in the same run;
(b) on the spawn process pool with 2 workers;
(c) on a local Ray instance (`--ray auto`) with 2 workers.

Each is a `simtune sweep ... --json` command in a fresh process; its `seconds` (the sweep, from
nothing to the Parquet table) is what is compared: the pool's and Ray's start-up (spawning
workers, importing the simulator in them; starting Ray) is included, as a user pays it. The three are interleaved and repeated, and the median and spread reported.
Ray's overhead per scenario is (median Ray time - median pool time) / scenarios. The tables
of the three are checked to hold the same rows.

Usage: python benchmarks/bench_sweep.py [--quick] [--repeats N] [--markdown-only]
Writes benchmarks/results/sweep.json and sweep.md atomically.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common
import pandas as pd
import yaml

from tuner.sweep import parse_sweep

OUT_JSON, OUT_MD = common.RESULTS / "sweep.json", common.RESULTS / "sweep.md"
SPEC = {  # 5 x 5 x 4 x 2 x 5 x 2 = 2,000 scenarios
    "command": "simulate train",
    "options": {"plan": "debug", "plan.dp": "auto", "plan.schedule": "1f1b"},
    "axes": {
        "model": ["gpt3-125m", "gpt3-350m", "gpt3-760m", "gpt3-1.3b", "llama-3.2-1b"],
        "cluster": ["8xa100-40gb", "8xa100-80gb", "8xh100", "8xl4", "8xa10g"],
        "plan.tp": [1, 2, 4, 8],
        "plan.pp": [1, 2],
        "plan.micro_batch_size": [1, 2, 4, 8, 16],
        "plan.global_batch_size": [128, 256],
    },
}
QUICK_AXES = {"model": ["gpt3-125m", "gpt3-350m"], "cluster": ["8xa100-80gb", "8xh100"]}  # 320 scenarios
WORKERS = 2
SIMTUNE = Path(sys.executable).parent / "simtune"


def _load() -> float:
    return os.getloadavg()[0]


def run_once(spec_data: dict, how: str) -> dict:
    """One `simtune sweep` command in a fresh process, as a user runs it; `seconds` is the sweep
    itself (from the first scenario sent to the table's last flush), `command_s` the whole command."""
    folder = Path(tempfile.mkdtemp(prefix="bench-sweep-"))
    try:
        spec_path = folder / "spec.yaml"
        spec_path.write_text(yaml.safe_dump(spec_data, sort_keys=False))
        extra = {"serial": ["--workers", "1"], "pool": ["--workers", str(WORKERS)],
                 "ray": ["--workers", str(WORKERS), "--ray", "auto"]}[how]
        load = _load()
        t0 = time.perf_counter()
        done = subprocess.run([str(SIMTUNE), "sweep", str(spec_path), "--out", str(folder / "out"), "--json", *extra],
                              capture_output=True, text=True, check=True)
        command_s = time.perf_counter() - t0
        result = json.loads(done.stdout)
        table = pd.read_parquet(result["table"]).drop(columns=["seconds"]).sort_values("scenario_id")
        return {"how": how, "seconds": result["seconds"], "command_s": command_s, "scenarios": result["ran"],
                "status": result["status"], "load_1min_before": load, "table": table.reset_index(drop=True)}
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def summarise(runs: list[dict], scenarios: int) -> dict:
    out = {}
    for how in ("serial", "pool", "ray"):
        times = [r["seconds"] for r in runs if r["how"] == how]
        if not times:
            continue
        med = statistics.median(times)
        command = statistics.median(r["command_s"] for r in runs if r["how"] == how)
        out[how] = {"seconds": times, "median_s": med, "spread_s": [min(times), max(times)], "command_median_s": command,
                    "scenarios_per_s": scenarios / med, "speedup_over_serial": None}
    for how in out:
        out[how]["speedup_over_serial"] = out["serial"]["median_s"] / out[how]["median_s"]
    if "ray" in out and "pool" in out:
        out["ray_overhead_per_scenario_ms"] = 1e3 * (out["ray"]["median_s"] - out["pool"]["median_s"]) / scenarios
        # inside the noise when the spreads overlap
        p, r = out["pool"]["spread_s"], out["ray"]["spread_s"]
        out["ray_vs_pool_inside_noise"] = not (r[0] > p[1] or p[0] > r[1])
    return out


def markdown(data: dict) -> str:
    s, n = data["summary"], data["scenarios"]
    status = ", ".join(f"{v:,} {k}" for k, v in data["status"].items() if v)
    lines = [f"`simulate train` sweep of {n:,} scenarios ({status}), {data['workers']} workers for the pool "
             f"and Ray, {data['repetitions']['repeats']} interleaved repeats on {data['machine']['cpu_count']} cores "
             f"(1-minute load average before each run: {min(data['loads']):.1f}-{max(data['loads']):.1f}).", "",
             "| backend | sweep s (median) | spread s | scenarios/s | vs serial | whole command s |",
             "|---|---:|---:|---:|---:|---:|"]
    names = {"serial": "serial, one process", "pool": f"process pool ({data['workers']}, spawn)",
             "ray": f"local Ray ({data['workers']} workers)"}
    for how, name in names.items():
        if how in s:
            r = s[how]
            lines.append(f"| {name} | {r['median_s']:.1f} | {r['spread_s'][0]:.1f}-{r['spread_s'][1]:.1f} | "
                         f"{r['scenarios_per_s']:,.1f} | {r['speedup_over_serial']:.2f}x | {r['command_median_s']:.1f} |")
    if "ray_overhead_per_scenario_ms" in s:
        noise = " (inside the noise: the spreads overlap)" if s["ray_vs_pool_inside_noise"] else ""
        lines += ["", f"Ray over the pool: {s['ray_overhead_per_scenario_ms']:+.2f} ms per scenario{noise}, "
                  "start-up included."]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="320 scenarios, one repeat")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--markdown-only", action="store_true")
    args = ap.parse_args()
    if args.markdown_only:
        common.write_text_atomic(markdown(json.loads(OUT_JSON.read_text())), OUT_MD)
        return
    spec_data = {**SPEC, "axes": {**SPEC["axes"], **QUICK_AXES}} if args.quick else SPEC
    spec = parse_sweep(spec_data)
    n, repeats = len(spec.scenarios()), 1 if args.quick else args.repeats
    backends = ["serial", "pool"] + (["ray"] if importlib.util.find_spec("ray") else [])
    runs, reference = [], None
    for rep in range(repeats):
        order = backends if rep % 2 == 0 else backends[::-1]  # interleaved, alternating order
        for how in order:
            r = run_once(spec_data, how)
            print(f"repeat {rep + 1}/{repeats} {how:6s} {r['seconds']:7.1f} s  {n / r['seconds']:7.1f} scenarios/s  "
                  f"(load {r['load_1min_before']:.1f})", flush=True)
            table = r.pop("table")
            if reference is None:
                reference = table
            else:
                pd.testing.assert_frame_equal(reference, table[reference.columns])  # the same rows
            runs.append(r)
    data = {**common.run_fields("sweep", args.quick, {"repeats": repeats}), "spec": spec_data, "scenarios": n,
            "workers": WORKERS, "status": runs[0]["status"], "loads": [r["load_1min_before"] for r in runs],
            "runs": runs, "summary": summarise(runs, n)}
    if not args.quick:
        common.write_text_atomic(json.dumps(data, indent=2) + "\n", OUT_JSON)
        common.write_text_atomic(markdown(data), OUT_MD)
    print(markdown(data))


if __name__ == "__main__":
    main()
