"""Benchmark graph partitioning: a generated 10M-edge graph into 8 parts, by each method.

For `random`, `metis` and `metis-balanced`: wall time of `partition_graph` (which includes the
halo sets, the edge cut and the loads it reports), peak memory, edge-cut fraction, halo nodes and
the balance of nodes, edges and training nodes. Each run is a fresh child process that loads the
graph's arrays from a temporary .npz, so its peak resident memory (ru_maxrss) is this method's
alone: `peak_rss_bytes` is the child's high-water mark, `extra_rss_bytes` what partitioning added
on top of the loaded graph (0 when partitioning never rose above the high-water mark that loading
the .npz left, as for random). The baseline, measured in the same run, is random partitioning; the
other methods are printed as ratios to it (time, edge cut, halo nodes). Also timed: generating the
graph (`community-10m`: 500,000 nodes, 10M stored edges, 64 communities, power-law degrees).

Usage: python benchmarks/bench_gnn_partition.py [--quick] [--out PATH] [--markdown-only]
Writes JSON (default benchmarks/results/gnn_partition.json) atomically and a markdown table beside it.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common

from simulator.gnn.graph import generate_graph
from simulator.gnn.partition import BALANCE_TOLERANCE, METHODS
from simulator.specs.catalog import load_graph

DEFAULT_OUT = common.RESULTS / "gnn_partition.json"
GRAPH = "community-10m"
PARTS = 8
REPS = (3, 1)  # full, --quick

CHILD = r"""
import json, resource, sys, time
import numpy as np
from simulator.gnn.graph import Graph
from simulator.gnn.partition import partition_graph
data = np.load(sys.argv[1])
g = Graph(name="g", num_nodes=int(data["num_nodes"]), indptr=data["indptr"], indices=data["indices"],
          train_mask=data["train_mask"], symmetric=True)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
t0 = time.perf_counter()
p = partition_graph(g, int(sys.argv[2]), sys.argv[3], seed=0)
seconds = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"seconds": seconds, "peak_rss_bytes": peak, "extra_rss_bytes": peak - before,
                  "edge_cut_fraction": p.edge_cut_fraction, "balance": p.balance,
                  "halo_nodes": sum(p.halo_sizes()), "max_halo_nodes": max(p.halo_sizes())}))
"""


def run_child(path: Path, method: str) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, str(path), str(PARTS), method], check=True,
                         capture_output=True, text=True, cwd=common.ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench(reps: int) -> dict:
    import numpy as np

    t0 = time.perf_counter()
    graph = generate_graph(load_graph(GRAPH))
    generate_s = time.perf_counter() - t0
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "graph.npz"
        np.savez(path, num_nodes=graph.num_nodes, indptr=graph.indptr, indices=graph.indices,
                 train_mask=graph.train_mask)
        for method in METHODS:
            runs = []
            for r in range(reps):
                print(f"  {method} run {r + 1}/{reps}", file=sys.stderr, flush=True)
                runs.append(run_child(path, method))
            times = [x["seconds"] for x in runs]
            rows[method] = {**runs[-1], "seconds": statistics.median(times), "seconds_runs": times,
                            "peak_rss_bytes": max(x["peak_rss_bytes"] for x in runs),
                            "extra_rss_bytes": max(x["extra_rss_bytes"] for x in runs)}
    base = rows["random"]
    for row in rows.values():
        row["vs_random"] = {"seconds": row["seconds"] / base["seconds"],
                            "edge_cut": row["edge_cut_fraction"] / base["edge_cut_fraction"],
                            "halo_nodes": row["halo_nodes"] / base["halo_nodes"]}
    return {"graph": GRAPH, "num_nodes": graph.num_nodes, "num_edges": graph.num_edges, "parts": PARTS,
            "generate_seconds": generate_s, "graph_bytes": int(graph.indptr.nbytes + graph.indices.nbytes),
            "balance_tolerance": BALANCE_TOLERANCE, "methods": rows}


def markdown(result: dict) -> str:
    b = result["bench"]
    lines = [f"Partitioning `{b['graph']}` ({b['num_nodes']:,} nodes, {b['num_edges']:,} stored edges) into "
             f"{b['parts']} parts; generated in {b['generate_seconds']:.1f} s. Median of "
             f"{result['repetitions']['runs']} runs; ratios are to random partitioning in the same run.", "",
             "| method | time (s) | peak RSS (GiB) | added RSS (GiB) | edge cut | vs random | halo nodes | "
             "balance nodes / edges / train |", "|---|---:|---:|---:|---:|---:|---:|---|"]
    for method, r in b["methods"].items():
        bal = " / ".join(f"{r['balance'][k]:.3f}" for k in ("nodes", "edges", "train_nodes"))
        lines.append(f"| {method} | {r['seconds']:.2f} | {r['peak_rss_bytes'] / 2**30:.2f} | "
                     f"{r['extra_rss_bytes'] / 2**30:.2f} | {r['edge_cut_fraction']:.3f} | "
                     f"{r['vs_random']['edge_cut']:.2f}x | {r['halo_nodes']:,} | {bal} |")
    return "\n".join(lines) + "\n"


def findings(b: dict) -> list[str]:
    flags = []
    for method in ("metis", "metis-balanced"):
        if b["methods"][method]["vs_random"]["edge_cut"] > 0.5:
            flags.append(f"{method} cuts more than half of random's edges")
    worst = max(b["methods"]["metis-balanced"]["balance"].values())
    if worst > 1 + BALANCE_TOLERANCE:
        flags.append(f"metis-balanced balance {worst:.3f} above the tolerance {1 + BALANCE_TOLERANCE}")
    return flags


def main(argv: list[str] | None = None) -> dict:
    args = common.parser(__doc__.splitlines()[0], "1 run per method", DEFAULT_OUT).parse_args(argv)
    if args.markdown_only:
        return common.rewrite_markdown(args.out, markdown)
    reps = REPS[1] if args.quick else REPS[0]
    b = bench(reps)
    result = {**common.run_fields("gnn_partition", args.quick, {"runs": reps}), "bench": b}
    print(markdown(result))
    flags = findings(b)
    common.print_findings(flags)
    result["findings"] = flags
    common.write_results(result, args.out, markdown)
    return result


if __name__ == "__main__":
    main()
