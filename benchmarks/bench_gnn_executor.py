"""Train a GNN for real on this machine's CPU ranks: METIS vs random partitions, measured vs simulated.

(a) METIS vs random on a generated community graph (`community-20k`: 20,000 nodes, 400,000
    stored edges, 8 communities) with 2 ranks: remote feature bytes and epoch time of random
    over METIS, both measured in this run, interleaved (metis, random, metis, random, ...).
(b) Measured vs simulated epoch time on 1 and 2 ranks (METIS): `executor.gnn.run_gnn` against
    `simulate_gnn` on `1xcpu` / `2xcpu` with the committed CPU profile, the same partition
    handed to both. Target: within 25%.

(c) The same comparison against a profile of the GNN operations measured in this run: before
    each repeat the profiler's `gnn` family is timed again (into a copy of the committed profile),
    and every run is also predicted from that repeat's measurements. The machine is shared, and
    its load moves both the epochs and the operations' times by up to 2x within minutes; the
    same-run prediction sees the load the epochs see, the committed one the load of its day.

Every run: `graphsage-3` (DistDGL's model: 3 layers, hidden 256, fan-outs 15, 10, 5), 1,000
seeds per trainer, features partitioned without a cache, sampling and fetching inline (no
sampler threads, no pipelined fetch: the plainest plan to compare), fp32; 3 epochs, the
first dropped, the median of the other two of the slowest rank; no evaluation. Each
configuration runs `repeats` times; the report gives the median and the spread.

Usage: python benchmarks/bench_gnn_executor.py [--quick] [--out PATH] [--markdown-only]
Writes benchmarks/results/gnn_executor.json and .md atomically.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import tempfile
from functools import cache
from pathlib import Path
from typing import Any

import common

from executor.gnn.run import run_gnn
from profiler.run import run_profile
from profiler.store import this_machines_profile
from simulator.gnn.graph import build_graph
from simulator.gnn.partition import partition_graph
from simulator.gnn.simulate import simulate_gnn
from simulator.specs.catalog import load_cluster
from simulator.specs.profile import META_FILE, resolve_profile_path

DEFAULT_OUT = common.RESULTS / "gnn_executor.json"
TARGET = 0.25
GRAPH, MODEL = "community-20k", "graphsage-3"
PLAN = {"name": "bench-inline", "partition": "metis", "trainers_per_machine": 1, "samplers_per_trainer": 0,
        "batch_size_per_trainer": 1000, "feature_placement": "partitioned", "feature_cache_fraction": 0.0,
        "pipeline_fetch": False, "feature_dtype": "fp32"}
EPOCHS = 3
# (label, ranks, partition method), in the order they run within each repeat
CONFIGS = [("1 rank", 1, "metis"), ("2 ranks metis", 2, "metis"), ("2 ranks random", 2, "random")]


def run_config(ranks: int, method: str, compare: bool) -> dict[str, Any]:
    r = run_gnn(GRAPH, MODEL, {**PLAN, "partition": method}, ranks, epochs=EPOCHS, compare=compare, evaluate=False)
    return {"epoch_time_s": r.epoch_time_s, "breakdown": r.breakdown, "remote_bytes_per_epoch": r.remote_bytes_per_epoch,
            "sampling_bytes_per_epoch": r.sampling_bytes_per_epoch, "input_nodes_per_batch": r.input_nodes_per_batch,
            "iterations_per_epoch": r.iterations_per_epoch, "edge_cut_fraction": r.partition["edge_cut_fraction"],
            "predicted_epoch_time_s": r.predicted_epoch_time_s, "predicted_breakdown": r.predicted_breakdown,
            "predicted_iterations_per_epoch": r.predicted_iterations_per_epoch,
            "predicted_remote_bytes_per_epoch": r.predicted_remote_bytes_per_epoch, "profile": r.profile,
            "core_share": min(r.core_share), "notes": r.notes}


def same_run_profile(root: Path) -> Path:
    """The committed CPU profile with its `gnn` family measured again now, under `root`."""
    committed = resolve_profile_path(this_machines_profile() or load_cluster("1xcpu").profile)
    shutil.copytree(committed, root)
    meta = json.loads((root / META_FILE).read_text())
    meta["tables"].pop("gnn", None)
    meta["fits"].pop("gnn", None)
    (root / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    (root / "gnn.csv").unlink(missing_ok=True)
    return run_profile(root, ops=("gnn",))


@cache
def _partition(ranks: int, method: str):
    graph = build_graph(GRAPH)
    return graph, partition_graph(graph, ranks, method, seed=0)  # what run_gnn partitions with (seed 0)


def predict(ranks: int, method: str, profile: Path) -> float:
    graph, part = _partition(ranks, method)
    return simulate_gnn(graph, MODEL, load_cluster(f"{ranks}xcpu", profile), {**PLAN, "partition": method},
                        partition=part).epoch_time_s


def spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def run(quick: bool) -> dict[str, Any]:
    repeats = 1 if quick else 3
    load_before = os.getloadavg()[0]
    runs: dict[str, list[dict[str, Any]]] = {label: [] for label, _, _ in CONFIGS}
    tmp = Path(tempfile.mkdtemp(prefix="simtune-bench-gnn-"))
    for i in range(repeats):  # interleaved: a slow minute of the shared machine hits every configuration
        profile = same_run_profile(tmp / f"repeat-{i}")
        for label, ranks, method in CONFIGS:
            runs[label].append(run_config(ranks, method, compare=i == 0))
            runs[label][-1]["same_run_predicted_epoch_time_s"] = predict(ranks, method, profile)
            print(f"repeat {i + 1}/{repeats} {label}: epoch {runs[label][-1]['epoch_time_s']:.3f} s", flush=True)
    shutil.rmtree(tmp, ignore_errors=True)
    rows = []
    for label, ranks, method in CONFIGS:
        rs, first = runs[label], runs[label][0]
        epoch = spread([r["epoch_time_s"] for r in rs])
        predicted = first["predicted_epoch_time_s"]
        rows.append({
            "label": label, "ranks": ranks, "partition": method, "epoch_time_s": epoch,
            "iterations_per_epoch": first["iterations_per_epoch"],
            "breakdown": {k: statistics.median(r["breakdown"][k] for r in rs) for k in first["breakdown"]},
            "remote_bytes_per_epoch": statistics.median(r["remote_bytes_per_epoch"] for r in rs),
            "sampling_bytes_per_epoch": statistics.median(r["sampling_bytes_per_epoch"] for r in rs),
            "input_nodes_per_batch": statistics.median(r["input_nodes_per_batch"] for r in rs),
            "edge_cut_fraction": first["edge_cut_fraction"], "predicted_epoch_time_s": predicted,
            "predicted_iterations_per_epoch": first["predicted_iterations_per_epoch"],
            "predicted_breakdown": first["predicted_breakdown"],
            "predicted_remote_bytes_per_epoch": first["predicted_remote_bytes_per_epoch"],
            "error": epoch["median"] / predicted - 1 if predicted else None, "profile": first["profile"],
            "same_run_predicted_epoch_time_s": spread([r["same_run_predicted_epoch_time_s"] for r in rs]),
            "same_run_error": spread([r["epoch_time_s"] / r["same_run_predicted_epoch_time_s"] - 1 for r in rs]),
            "core_share": spread([r["core_share"] for r in rs]), "notes": first["notes"]})
    by = {r["label"]: r for r in rows}
    metis, rnd = by["2 ranks metis"], by["2 ranks random"]
    paired = [r["epoch_time_s"] / m["epoch_time_s"] for m, r in zip(runs["2 ranks metis"], runs["2 ranks random"])]
    comparison = {
        "remote_bytes_ratio_random_over_metis": rnd["remote_bytes_per_epoch"] / metis["remote_bytes_per_epoch"],
        "epoch_time_ratio_random_over_metis": spread(paired),
        "predicted_epoch_time_ratio_random_over_metis": (rnd["predicted_epoch_time_s"] / metis["predicted_epoch_time_s"]
                                                         if metis["predicted_epoch_time_s"] else None),
    }
    return {**common.run_fields("gnn_executor", quick, {"repeats": repeats, "epochs": EPOCHS, "timed_epochs": EPOCHS - 1}),
            "load_average_1min": {"before": load_before, "after": os.getloadavg()[0]},
            "graph": GRAPH, "model": MODEL, "plan": PLAN, "target_abs_error": TARGET, "rows": rows,
            "metis_vs_random": comparison}


def markdown(result: dict[str, Any]) -> str:
    c = result["metis_vs_random"]
    t = c["epoch_time_ratio_random_over_metis"]
    m = result["machine"]
    lines = [
        "# GNN executor: real distributed training on this machine's CPU ranks", "",
        f"`{result['model']}` on `{result['graph']}`, plan `{result['plan']['name']}` (1,000 seeds per trainer, "
        "partitioned features, no cache, sampling and fetching inline), gloo ranks of one thread each on "
        f"{m['cpu_model']} ({m['cpu_count']} cores, shared). Epoch time: the slowest rank, median over "
        f"{result['repetitions']['timed_epochs']} epochs after the first, then the median (min-max) over "
        f"{result['repetitions']['repeats']} interleaved repeats. Predicted: `simulate_gnn` on `Nxcpu` with the profile named, "
        f"the same partition. Target: |error| <= {result['target_abs_error']:.0%}. Core share: the least-served "
        "rank's CPU time over its wall time (a rank waiting on a peer also lowers it)."
        + _load_note(result), "",
        "| run | edge cut | iterations | measured epoch s (min-max) | predicted s | error | remote MB/epoch: feature "
        "rows + sampling (predicted) | sample / fetch remote / compute / all-reduce s, measured (predicted) | core share |",
        "|---|---:|---:|---:|---:|---:|---:|---|---:|"]
    for r in result["rows"]:
        e, b = r["epoch_time_s"], r["breakdown"]
        pred = "-" if r["predicted_epoch_time_s"] is None else f"{r['predicted_epoch_time_s']:.3f}"
        err = "-" if r["error"] is None else f"{r['error']:+.0%}"
        prb = r["predicted_remote_bytes_per_epoch"]
        lines.append(
            f"| {r['label']} | {r['edge_cut_fraction']:.1%} | {r['iterations_per_epoch']} | {e['median']:.3f} "
            f"({e['min']:.3f}-{e['max']:.3f}) | {pred} | {err} | "
            f"{(r['remote_bytes_per_epoch'] + r['sampling_bytes_per_epoch']) / 1e6:.2f} "
            f"({'-' if prb is None else f'{prb / 1e6:.2f}'}) | "
            + " / ".join(f"{b[k]:.3f}" + _predicted_part(r, k) for k in ("sample", "fetch_remote", "compute", "allreduce"))
            + f" | {_share(r)} |")
    if all("same_run_error" in r for r in result["rows"]):
        lines += ["", "Against the GNN operations timed again in the same run, before each repeat (paired per "
                  "repeat: median (min-max)):", "",
                  "| run | predicted s, same-run profile | error |", "|---|---:|---:|"]
        for r in result["rows"]:
            p, e = r["same_run_predicted_epoch_time_s"], r["same_run_error"]
            lines.append(f"| {r['label']} | {p['median']:.3f} ({p['min']:.3f}-{p['max']:.3f}) | {e['median']:+.0%} "
                         f"({e['min']:+.0%} to {e['max']:+.0%}) |")
    pr = c["predicted_epoch_time_ratio_random_over_metis"]
    lines += ["", f"Random over METIS on 2 ranks: remote feature bytes {c['remote_bytes_ratio_random_over_metis']:.2f}x, "
              f"epoch time {t['median']:.2f}x (paired repeats {t['min']:.2f}-{t['max']:.2f}x)"
              + ("" if pr is None else f"; the simulator predicts {pr:.2f}x") + ".", ""]
    return "\n".join(lines)


def _share(row: dict[str, Any]) -> str:
    """The slowest-served rank's CPU time over wall time (median over repeats): near 100% when
    every rank had a core of its own; lower when other work shared the cores."""
    share = row.get("core_share")
    return "-" if share is None else f"{share['median']:.0%}"


def _predicted_part(row: dict[str, Any], key: str) -> str:
    """' (x.xxx)': the simulator's seconds per epoch for that part, when it predicted."""
    pb = row.get("predicted_breakdown")
    return "" if not pb else f" ({pb.get(key, 0.0):.3f})"


def _load_note(result: dict[str, Any]) -> str:
    load = result.get("load_average_1min")
    return "" if not load else (f" One-minute load average {load['before']:.1f} before and {load['after']:.1f} after "
                                f"the run, on {result['machine']['cpu_count']} cores.")


def main() -> None:
    p = common.parser(__doc__.splitlines()[0], "1 repeat instead of 3", DEFAULT_OUT)
    args = p.parse_args()
    if args.markdown_only:
        common.rewrite_markdown(args.out, markdown)
        return
    result = run(args.quick)
    for r in result["rows"]:
        print(f"{r['label']}: measured {r['epoch_time_s']['median']:.3f} s, predicted {r['predicted_epoch_time_s']}")
    common.write_results(result, args.out, markdown)


if __name__ == "__main__":
    main()
