"""Generate notebooks/sweeps.ipynb from the cell sources below (no outputs).

The notebook is written from this script so that reviews read plain Python, not JSON. Cells
get fixed ids, so regenerating an unchanged notebook changes nothing. The sweep, its table and
its figures come from `tuner.sweep`; cells only call them.

Usage: python notebooks/build_sweeps_notebook.py
"""

from __future__ import annotations

from pathlib import Path

from nbbuild import write

OUT = Path(__file__).with_name("sweeps.ipynb")

CELLS: list[tuple[str, str]] = [
    ("md", """\
# What-if sweeps: 200 training scenarios, their time, their cost, and where they stop fitting

One question asked 200 times: *how long does an iteration take, what does it cost, and does it
fit?* for 5 GPT-3 sizes x 5 clusters of 8 GPUs x 4 micro-batch sizes x 2 global batches, all on
the same plan family (tensor parallel 8 inside the node, no pipeline, ZeRO-1, no recompute, so
that memory is what limits). The notebook reads in four steps:

1. **Estimate** - the sweep (`tuner.sweep.run_sweep`, what `simtune sweep` runs), read back
   from its Parquet table.
2. **Independent check** - a row of the table against a direct `simulate_training` call.
3. **The table, three ways** - time and cost heat maps, the Pareto front of time vs cost, and
   the largest micro-batch that still fits per model and cluster.
4. **Conclusion** - computed from the table when the notebook runs; nothing typed in by hand.

Prices are the clusters' `price_per_device_hour` (AWS On-Demand list prices, see each cluster's
YAML for the instance and the date); a cost is the rent of all 8 GPUs for the time simulated."""),
    ("code", """\
import tempfile
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd

from simulator.training import simulate_training
from tuner.sweep import parse_sweep, read_sweep, run_sweep
from tuner.sweep.analysis import heat, largest_fitting, pareto_front, plot_front, plot_heatmap

pd.options.display.float_format = "{:,.4g}".format
SPEC = {
    "command": "simulate train",
    "options": {"plan": "debug", "plan.tp": 8, "plan.pp": 1, "plan.dp": "auto", "plan.schedule": "1f1b",
                "plan.zero_stage": 1},
    "axes": {
        "model": ["gpt3-350m", "gpt3-1.3b", "gpt3-2.7b", "gpt3-6.7b", "gpt3-13b"],
        "cluster": ["8xl4", "8xa10g", "8xa100-40gb", "8xa100-80gb", "8xh100"],
        "plan.micro_batch_size": [1, 2, 4, 8],
        "plan.global_batch_size": [128, 512],
    },
}"""),
    ("md", "## 1. Estimate: the sweep, into a Parquet table"),
    ("code", """\
out = Path(tempfile.mkdtemp(prefix="sweeps-notebook-"))
result = run_sweep(parse_sweep(SPEC), out, workers=1)
spec, df = read_sweep(out)
print(f"{result.ran} scenarios in {result.seconds:.1f} s ({result.scenarios_per_s:.0f}/s): {result.status}")
df[["model", "cluster", "plan.micro_batch_size", "plan.global_batch_size", "status", "iteration_time_s",
    "mfu", "peak_memory_bytes", "cost_per_million_tokens_usd"]].head(8)"""),
    ("md", """\
## 2. Independent check: a row against a direct call

The sweep calls the simulator in-process, exactly as `simtune simulate train` does. One row,
re-simulated from its own spec, gives the same iteration time and cost."""),
    ("code", """\
row = df[df["status"] == "ok"].iloc[len(df[df["status"] == "ok"]) // 2]
plan = {"name": "check", "tp": 8, "pp": 1, "dp": 1, "schedule": "1f1b", "zero_stage": 1,
        "micro_batch_size": int(row["plan.micro_batch_size"]), "global_batch_size": int(row["plan.global_batch_size"])}
direct = simulate_training(row["model"], row["cluster"], plan)
check = pd.DataFrame({"sweep table": [row["iteration_time_s"], row["cost_per_million_tokens_usd"]],
                      "direct call": [direct.iteration_time_s, direct.cost_per_million_tokens_usd]},
                     index=["iteration_time_s", "cost_per_million_tokens_usd"])
assert abs(check["sweep table"] / check["direct call"] - 1).max() < 1e-12
check"""),
    ("md", """\
## 3. Time and cost over models and clusters

Each cell is the best over micro-batch sizes of the larger global batch (512 sequences); a
blank cell is a (model, cluster) pair where no micro-batch fits. Time per iteration grows with
the model; cost per million tokens shows which cluster is cheapest for each size, which is not
always the fastest one."""),
    ("code", """\
big = df[df["plan.global_batch_size"] == 512]
fig, (left, right) = plt.subplots(1, 2, figsize=(14, 4.5))
plot_heatmap(big, "cluster", "model", "iteration_time_s", ax=left)
plot_heatmap(big, "cluster", "model", "cost_per_million_tokens_usd", ax=right)
left.set_title("iteration time (s), best micro-batch")
right.set_title("USD per million training tokens, best micro-batch")
fig.tight_layout()"""),
    ("md", """\
## The Pareto front of time vs cost, per model

For one model, a scenario is on the front when no other is both at least as fast and at least
as cheap. Faster hardware costs more per GPU-hour; the front shows where paying it buys
proportionally more speed."""),
    ("code", """\
fronts = {m: pareto_front(big[big["model"] == m], "iteration_time_s", "cost_per_million_tokens_usd")
          for m in spec.axes["model"]}
ax = plot_front(big[big["model"] == "gpt3-6.7b"], spec)
ax.set_title("gpt3-6.7b, global batch 512: every scenario that fits, and its front")
pd.concat({m: f[["cluster", "plan.micro_batch_size", "iteration_time_s", "cost_per_million_tokens_usd"]]
           for m, f in fronts.items()}).droplevel(1)"""),
    ("md", """\
## Where each configuration stops fitting

The largest micro-batch that fits, per model and cluster (NaN: not even one sequence fits with
this plan family); one step past it, the plan runs out of device memory. The messages of the
infeasible rows say which memory ran out."""),
    ("code", """\
fits = largest_fitting(big, "model", "cluster", "plan.micro_batch_size")
display(fits)
print(df[df["status"] == "infeasible"]["message"].iloc[0])"""),
    ("md", "## 4. Conclusion (computed)"),
    ("code", """\
ok = big[big["status"] == "ok"]
cheapest = ok.loc[ok.groupby("model")["cost_per_million_tokens_usd"].idxmin()]
fastest = ok.loc[ok.groupby("model")["iteration_time_s"].idxmin()]
time_grid = heat(big, "cluster", "model", "iteration_time_s")
for m in spec.axes["model"]:
    c, f = cheapest[cheapest["model"] == m].iloc[0], fastest[fastest["model"] == m].iloc[0]
    no_fit = [cl for cl in spec.axes["cluster"] if pd.isna(fits.loc[m, cl])]
    print(f"{m}: fastest on {f['cluster']} ({f['iteration_time_s']:.2f} s/iteration, "
          f"${f['cost_per_million_tokens_usd']:.2f}/M tokens); cheapest on {c['cluster']} "
          f"(${c['cost_per_million_tokens_usd']:.2f}/M tokens, {c['iteration_time_s']:.2f} s); "
          + (f"does not fit on {', '.join(no_fit)}" if no_fit else "fits on every cluster"))
print(f"{(df['status'] == 'ok').sum()} of {len(df)} scenarios fit; {(df['status'] == 'infeasible').sum()} run out of memory")"""),
]

if __name__ == "__main__":
    write(CELLS, OUT)
