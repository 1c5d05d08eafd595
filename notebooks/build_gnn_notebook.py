"""Generate notebooks/gnn.ipynb from the cell sources below (no outputs).

The notebook is written from this script so that reviews read plain Python, not JSON. Figures
and tables come from `simulator.gnn.plots`; cells only call them. It runs in about a minute on
2 cores (a 20,000-node generated graph; the large graphs take the statistical path).

Usage: python notebooks/build_gnn_notebook.py
"""

from __future__ import annotations

from pathlib import Path

from nbbuild import write

OUT = Path(__file__).with_name("gnn.ipynb")

CELLS: list[tuple[str, str]] = [
    ("md", """\
# Distributed GNN training: partitioning, epoch time, and measurement

DistDGL (Zheng et al., arXiv 2010.05337) trains GraphSAGE on graphs split across machines: each machine owns
a part, its samplers draw mini-batch neighborhoods (asking the owners' servers for remote nodes), its trainers
pull the input features (remote rows from the owners' servers) and compute, and the gradients are all-reduced.
This notebook reads in four steps:

1. **Partition quality** by method on a generated community graph: edge cut, halo, balance.
2. **Estimate**: the simulated epoch as machines are added, and where an iteration's time goes.
3. **Published figures**: `simtune validate gnn` against DistDGL's numbers.
4. **Measurement**: simtune's own executor on this machine against the simulator, when the benchmark's
   results exist; then the conclusions, computed from the numbers above."""),
    ("code", """\
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd

from simulator.gnn.graph import build_graph
from simulator.gnn.plots import (
    breakdown_bars,
    epoch_vs_machines,
    measured_vs_simulated,
    partition_quality,
    plot_measured_vs_simulated,
    plot_partition_quality,
)
from simulator.gnn.simulate import simulate_gnn
from simulator.gnn.validation import validate_gnn, with_communities
from simulator.specs.catalog import load_graph

pd.options.display.float_format = "{:,.3f}".format
PLAN = {"trainers_per_machine": 2, "samplers_per_trainer": 4, "batch_size_per_trainer": 2000}"""),
    ("md", """\
## 1. Partition quality by method

`community-20k`: 20,000 nodes in 8 communities, 80% of each node's edges inside its community. METIS cuts
far fewer edges than random; `metis-balanced` also balances edges and training nodes. The second table
concentrates the training nodes in a quarter of the communities (`train_community_fraction`, as ogbn-papers100M's
labelled arXiv papers are): plain METIS, which balances node counts only, then leaves the training nodes
imbalanced, and the balanced variant repairs it at some extra cut."""),
    ("code", """\
graph = build_graph("community-20k")
spread = partition_quality(graph, 4)
concentrated = partition_quality(build_graph(load_graph("community-20k").model_copy(
    update={"train_fraction": 0.05, "val_fraction": 0.0, "test_fraction": 0.0, "train_community_fraction": 0.25})), 4)
display(spread, concentrated)
plot_partition_quality(concentrated)
plt.tight_layout()"""),
    ("md", """\
## 2. Epoch time as machines are added, and the breakdown

ogbn-products with GraphSAGE-3 (fan-outs 15, 10, 5) on m5n.24xlarge machines, DistDGL's plan (2 trainers and 4
samplers per machine, 2000 seeds per trainer), with the assumed community structure of the validation
(communities = classes). With a fixed batch per trainer the epoch shrinks, but less than linearly on a graph
this small: each added machine makes more of every neighborhood remote. Random partitioning pays for its
remote samples and pulls at every size."""),
    ("code", """\
products = with_communities("ogbn-products")
scaling = epoch_vs_machines(products, "graphsage-3", "m5n-24xlarge", PLAN, [2, 4, 8, 16])
scaling"""),
    ("code", """\
reports = {f"products, 4, {m}": simulate_gnn(products, "graphsage-3", "4xm5n-24xlarge", {**PLAN, "partition": m})
           for m in ("metis-balanced", "random")}
reports["papers100M, 16, metis-balanced"] = simulate_gnn(
    with_communities("ogbn-papers100m"), "graphsage-3", "16xm5n-24xlarge", {**PLAN, "partition": "metis-balanced"})
breakdown_bars(reports)
plt.tight_layout()
pd.DataFrame({k: r.trainer_loads[0].stages_s for k, r in reports.items()}).T * 1e3  # ms, before overlap"""),
    ("md", """\
The stages table is each stage's own duration on machine 0 before overlap: samplers run alongside the
trainer, and so does the machine's server, which answers the other machines' remote samples and feature
pulls (`serve`). The bars are the critical path: a random partition makes the servers the bottleneck."""),
    ("md", "## 3. Against DistDGL's published figures"),
    ("code", """\
validation = validate_gnn()
table = pd.DataFrame(validation.rows).set_index("id")[["quantity", "predicted", "measured", "target", "passed", "note"]]
table"""),
    ("md", """\
## 4. Measured on this machine against the simulator

`benchmarks/bench_gnn_executor.py` runs simtune's executor (gloo ranks on this machine's cores) and records
the simulator's prediction for the same plan on `Nxcpu`."""),
    ("code", """\
measured = measured_vs_simulated(Path("..") / "benchmarks" / "results" / "gnn_executor.json")
if measured is None:
    print("benchmarks/results/gnn_executor.json does not exist yet: run benchmarks/bench_gnn_executor.py")
else:
    plot_measured_vs_simulated(measured)
    plt.tight_layout()
    display(measured)"""),
    ("md", "## Conclusions (computed)"),
    ("code", """\
rows = {r["id"]: r for r in validation.rows}
gain = spread.loc["random", "edge_cut_fraction"] / spread.loc["metis", "edge_cut_fraction"]
lines = [
    f"METIS cuts {gain:.1f}x fewer edges than random on community-20k; with a concentrated training set plain "
    f"METIS's training-node balance is {concentrated.loc['metis', 'balance_train_nodes']:.2f}, balanced METIS's "
    f"{concentrated.loc['metis-balanced', 'balance_train_nodes']:.2f}.",
    f"ogbn-products, 2 -> 16 machines: {scaling.iloc[0, 0] / scaling.iloc[-1, 0]:.1f}x faster (linear: "
    f"{scaling.index[-1] / scaling.index[0]:.0f}x).",
    f"DistDGL checks passed: {validation.summary['passed']} of {validation.summary['judged']} "
    f"(16-machine papers100M epoch {rows['papers100m-16']['predicted']:.1f} s vs 13 s; METIS over random on "
    f"products {rows['products-metis']['predicted']:.2f}x vs 2.14x; plain METIS over random on papers100M "
    f"{rows['papers100m-metis']['predicted']:.2f}x, published < 1).",
]
if measured is not None:
    lines.append("executor vs simulator on this machine: " + ", ".join(
        f"{run} {row.error:+.0%}" for run, row in measured.iterrows() if row.error is not None))
print("\\n".join(lines))"""),
]

if __name__ == "__main__":
    write(CELLS, OUT)
