"""The same seed gives the same report, across runs and across processes.

Two fresh Python processes (different hash seeds, so nothing may depend on set or dict-of-str
order) each run the commands that draw random numbers, and their JSON outputs must be equal to
the byte: the serving simulation (workload sampling: lognormal lengths, Poisson arrivals), the
GNN simulation (graph generation, METIS partitioning, neighbor sampling), `partition` with the
random method and a seed, and a sweep's table. Wall-clock fields (seconds, rates per second of
the search) are dropped before comparing; everything else must match. Both processes run in
folders of their own under the same relative names, so paths in the reports match too.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).parent

SCRIPT = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
from pathlib import Path
from robustness_support import run_cli

out = Path(".")  # each process in its own folder, with the same relative names in every report
(out / "wl.yaml").write_text("num_requests: 150\npreset: sharegpt-like\narrival: {kind: poisson, rate_per_s: 5}\nseed: 7\n")
(out / "sweep.yaml").write_text(
    "command: simulate serve\n"
    "options: {model: gpt-debug, cluster: 1xa100-80gb, deployment: vllm-tp1}\n"
    "axes: {workload: [wl.yaml, fixed-128-128]}\n")
results = {}
for name, argv in {
    "serve": ["simulate", "serve", "-m", "gpt-debug", "-c", "1xa100-80gb", "-d", "vllm-tp1", "-w", "wl.yaml"],
    "gnn": ["simulate", "gnn", "-g", "community-20k", "-m", "graphsage-3", "-c", "2xm5n-24xlarge", "-p", "distdgl-default"],
    "partition": ["partition", "-g", "community-20k", "-n", "3", "--method", "random", "--seed", "5"],
    "sweep": ["sweep", "sweep.yaml", "--out", "sweep", "--workers", "1"],
}.items():
    r = run_cli([*argv, "--json"], 120)
    assert r.code == 0, (name, r.stderr)
    results[name] = json.loads(r.stdout)
import pandas as pd
table = pd.read_parquet(out / "sweep" / "results.parquet")
results["sweep_table"] = json.loads(table.to_json(orient="records"))
print(json.dumps(results, sort_keys=True))
"""

WALL_CLOCK = ("seconds", "elapsed", "wall", "evaluations_per_s", "scenarios_per_s", "started", "finished")


def _without_wall_clock(obj):
    """The data minus fields that measure this machine's time or name this run's folder."""
    if isinstance(obj, dict):
        return {k: _without_wall_clock(v) for k, v in obj.items() if not any(w in k for w in WALL_CLOCK)}
    if isinstance(obj, list):
        return [_without_wall_clock(v) for v in obj]
    return obj


def test_same_seed_same_reports_across_processes(tmp_path):
    procs = []
    for i, hash_seed in enumerate(("1", "2")):
        out = tmp_path / f"run{i}"
        out.mkdir()
        env = {**os.environ, "PYTHONHASHSEED": hash_seed, "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, "-c", SCRIPT, str(TESTS)], env=env, cwd=out,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outputs = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=300)
        assert p.returncode == 0, stderr[-3000:]
        outputs.append(json.loads(stdout.strip().splitlines()[-1]))
    a, b = (_without_wall_clock(o) for o in outputs)
    for name in a:
        assert a[name] == b[name], name
    # the runs drew something: requests arrived at different times, parts differ in size
    assert a["serve"]["requests_per_s"] > 0
    assert len(a["sweep_table"]) == 2
