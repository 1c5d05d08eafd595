"""Generate notebooks/training_simulation.ipynb from the cell sources below (no outputs).

The notebook is written from this script so that reviews read plain Python, not JSON.
Cells get fixed ids, so regenerating an unchanged notebook changes nothing.

Usage: python notebooks/build_training_notebook.py
"""

from __future__ import annotations

from pathlib import Path

from nbbuild import write

OUT = Path(__file__).with_name("training_simulation.ipynb")

CELLS: list[tuple[str, str]] = [
    ("md", """\
# Training simulation: estimate, check, measure

How long does one training iteration of GPT-3 175B take on 128 A100s, and where does the time go?
This notebook reads in four steps:

1. **Estimate** - the simulator's prediction for a Megatron-style plan, and the 1F1B timeline it
   comes from.
2. **Independent estimate** - closed forms from the papers (FLOP count at the GEMM rate plus the
   pipeline bubble; the activation-memory formula of Korthikanti et al.) for the same plan.
3. **Measurement** - every published iteration time and memory figure in `validation/`
   (Narayanan et al. SC'21, Korthikanti et al. MLSys'23) against the simulator.
4. **Conclusion** - the measured errors; and, with the model checked, what-if questions nobody
   has measured (a faster network, a newer GPU).

Every number below is computed when the notebook runs; nothing is typed in by hand."""),
    ("code", """\
import matplotlib.pyplot as plt
import pandas as pd

from simulator.engine.timeline_plot import plot_timeline
from simulator.specs.catalog import load_cluster, load_model, load_plan
from simulator.training import simulate_training, training_timeline
from simulator.training.report import BREAKDOWN_KEYS
from simulator.training.validation import narayanan_flops, validate_training

pd.options.display.float_format = "{:,.3f}".format
MODEL, CLUSTER, PLAN = "gpt3-175b", "16x8xa100-80gb", "megatron-gpt3-175b"
model, cluster, plan = load_model(MODEL), load_cluster(CLUSTER), load_plan(PLAN)
plan.to_dict()"""),
    ("md", """\
## 1. Estimate: GPT-3 175B on 16 DGX A100 nodes

The catalog plan `megatron-gpt3-175b` follows Korthikanti et al.: TP 8 inside a node, interleaved
1F1B over 8 stages with 3 chunks each, sequence parallelism with selective recomputation, and the
distributed optimizer over 2 data-parallel replicas. The breakdown names where the slowest stage
spends the iteration; its parts sum to the iteration time."""),
    ("code", """\
report = simulate_training(model, cluster, plan)
print(f"iteration {report.iteration_time_s:.2f} s, MFU {report.mfu:.1%}, "
      f"{report.model_tflops_per_device:.0f} model TFLOP/s per GPU, "
      f"peak memory {report.peak_memory_bytes / 2**30:.1f} GiB of {report.device_memory_bytes / 2**30:.0f}")
report.plot_breakdown();"""),
    ("md", """\
### Where the estimate comes from: a 1F1B iteration, op by op

The simulator does not use a bubble formula: it runs every forward (blue) and backward (orange) of
every micro-batch on every stage as a discrete-event simulation and reads the iteration time off the
timeline. A small plan keeps the picture legible: the 1.7B-parameter Megatron GPT on one 8-GPU node,
TP 2 x PP 4, 8 micro-batches of 2. Stage 0 warms up with 4 forwards (one per stage), then alternates
one forward and one backward; the idle gaps are the pipeline bubble. Thin green bars are the
activations and gradients sent between stages. The memory plot shows why 1F1B's first stage holds
the most activations: it keeps p micro-batches in flight."""),
    ("code", """\
SMALL = dict(model="megatron-gpt-1.7b", cluster="8xa100-80gb",
             plan=dict(name="1f1b-demo", tp=2, pp=4, dp=1, schedule="1f1b",
                       global_batch_size=16, micro_batch_size=2))
events = training_timeline(**SMALL)
small = simulate_training(**SMALL)
fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(14, 3.6), width_ratios=[2.2, 1])
plot_timeline(events, ax=ax_t)
ax_t.set_title(f"1F1B, p=4, m=8: iteration {small.iteration_time_s * 1e3:.0f} ms, "
               f"bubble {small.breakdown['pipeline_bubble'] * 1e3:.0f} ms")
small.plot_memory(ax=ax_m)
ax_m.set(title="peak memory per stage")
fig.tight_layout()"""),
    ("md", """\
## 2. Independent estimate: closed forms for the same plan

Two formulas from the papers, computed without the simulator:

- **Time.** Narayanan et al. (SC'21, Eq. 3) count $96BsLh^2(1 + s/6h + V/16Lh)$ FLOPs per iteration
  with full recomputation, i.e. four passes; without the recomputed forward that is $72/96$ of it.
  Run at the A100's best GEMM rate (the device spec's `gemm_max` of the 16-bit peak) and stretched by
  the interleaved-1F1B bubble $(p-1)/(v\\,m)$ (Narayanan Sec. 2.2), this is a *lower bound*: it has no
  communication, no attention or element-wise kernels below GEMM speed, and no small-shard GEMM loss.
- **Activation memory.** Korthikanti et al. (MLSys'23, Eq. 5): with sequence parallelism and
  selective recomputation a layer holds $34\\,sbh/t$ bytes per micro-batch. The first stage holds
  $L/p$ layers for $p$ micro-batches, i.e. $L$ layers' worth, times $1 + (p-1)/(pv)$ under
  interleaving (their Sec. 4.2.3)."""),
    ("code", """\
s, b, h, L, t = model.seq_length, plan.micro_batch_size, model.hidden_size, model.num_layers, plan.tp
p, v, m = plan.pp, plan.virtual_stages, plan.num_microbatches
dev = cluster.device

model_flops = narayanan_flops(model, plan.global_batch_size) * 72 / 96
gemm_rate = cluster.num_devices * dev.peak_flops * dev.efficiency.gemm_max
closed_time_s = model_flops / gemm_rate * (1 + (p - 1) / (v * m))
closed_act_bytes = 34 * s * b * h / t * L * (1 + (p - 1) / (p * v))

independent = pd.DataFrame({
    "closed form": [closed_time_s, closed_act_bytes / 2**30],
    "simulator": [report.iteration_time_s, report.stages[0].memory["activations"] / 2**30],
}, index=["iteration time (s)", "stage-0 activations (GiB)"])
independent["simulator / closed form"] = independent["simulator"] / independent["closed form"]
independent"""),
    ("md", """\
The activation memory should agree exactly: the simulator generalizes the same per-tensor count
and tracks the in-flight micro-batches of the interleaved schedule event by event. The iteration
time should not: the closed form is a bound, and the simulator's breakdown says where the
difference goes. Which of the two is right is a question for measurements."""),
    ("code", """\
gap = pd.Series({
    "simulator - closed form": report.iteration_time_s - closed_time_s,
    "of which TP communication": report.breakdown["tp_comm"],
    "of which recompute": report.breakdown["recompute"],
    "of which DP + PP communication": report.breakdown["dp_comm"] + report.breakdown["pp_comm"],
}, name="seconds")
gap["rest: slower kernels, bubble, optimizer"] = gap.iloc[0] - gap.iloc[1:].sum()
gap.to_frame()"""),
    ("md", """\
## 3. Measurement: published runs

`validate_training()` simulates every row of `validation/training.yaml` - the weak-scaling table of
Narayanan et al. (SC'21, Table 1: TFLOP/s per GPU, 1.7B to 1T parameters on up to 3072 A100s) and the
iteration times and memory breakdowns of Korthikanti et al. (MLSys'23, Table 5 and Figure 1) - and
compares each prediction with the published number. The SC'21 rows count TFLOP/s with the paper's
Eq. 3, which is the inverse of iteration time for a fixed FLOP count."""),
    ("code", """\
validation = validate_training()
rows = pd.DataFrame(validation.rows)
summary = pd.DataFrame(validation.summary).T
rows[["id", "group", "quantity", "unit", "predicted", "measured", "error"]].style.format(
    {"predicted": "{:.2f}", "measured": "{:.2f}", "error": "{:+.1%}"})"""),
    ("code", """\
summary"""),
    ("code", """\
time_rows = rows[rows.group == "iteration time"]
panels = [
    ("SC'21: TFLOP/s per GPU", time_rows[time_rows.unit == "TFLOP/s"], "linear"),
    ("MLSys'23: iteration time (s)", time_rows[time_rows.unit == "s"], "log"),
    ("MLSys'23: memory (GiB)", rows[rows.group == "memory"], "log"),
]
fig, axes = plt.subplots(1, 3, figsize=(14, 4.2))
for ax, (title, df, scale) in zip(axes, panels):
    for quantity, part in df.groupby("quantity"):
        ax.scatter(part.measured, part.predicted, s=22, label=quantity)
    lo, hi = df[["measured", "predicted"]].min().min() * 0.9, df[["measured", "predicted"]].max().max() * 1.1
    ax.plot([lo, hi], [lo, hi], "k--", lw=1, label="y = x")
    ax.set(xscale=scale, yscale=scale, xlim=(lo, hi), ylim=(lo, hi),
           xlabel="published", ylabel="predicted",
           title=f"{title}\\nMAE {df.error.abs().mean():.1%} (n={len(df)})")
    ax.legend(fontsize=7)
fig.suptitle(f"iteration time MAE {validation.summary['iteration time']['mae']:.1%}, "
             f"memory MAE {validation.summary['memory']['mae']:.1%}")
fig.tight_layout()"""),
    ("md", """\
## 4. What-if: faster network, newer GPU

With the model checked against measurements, it can answer questions nobody has measured. Same model
and plan, three machines: the baseline; the same cluster with twice the inter-node bandwidth per GPU;
and DGX H100 nodes instead of DGX A100."""),
    ("code", """\
scenarios = {
    "A100 (baseline)": cluster,
    "A100, 2x inter-node bandwidth": cluster.model_copy(
        update={"inter_node_bandwidth_GBps": 2 * cluster.inter_node_bandwidth_GBps}),
    "H100": "16x8xh100",
}
whatif = {name: simulate_training(model, c, plan) for name, c in scenarios.items()}
base_s = whatif["A100 (baseline)"].iteration_time_s
pd.DataFrame({name: {"iteration time (s)": r.iteration_time_s, "speedup": base_s / r.iteration_time_s,
                     "MFU": r.mfu, "TP comm (s)": r.breakdown["tp_comm"],
                     "DP comm (s)": r.breakdown["dp_comm"]}
              for name, r in whatif.items()}).T"""),
    ("code", """\
breakdowns = pd.DataFrame({name: r.breakdown for name, r in whatif.items()}).T[list(BREAKDOWN_KEYS)]
ax = breakdowns.plot.barh(stacked=True, figsize=(10, 3))
ax.invert_yaxis()
ax.set_xlabel("seconds per iteration (slowest stage)")
ax.legend(fontsize=7, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.3));"""),
    ("md", """\
## 5. Conclusion

The cell below states the result from the numbers computed above: the mean absolute error of the
predicted iteration times and memory figures against the published measurements, each against its
target; how the simulator compares with the closed-form estimates; and the what-if speedups.
Read the breakdown chart for *why*: for this plan the tensor-parallel all-reduces run inside a node,
so how much a faster inter-node network buys depends on how much of the time the inter-node (DP and
PP) transfers actually expose."""),
    ("code", """\
for group, res in validation.summary.items():
    verdict = ("reported, no target" if res["target"] is None
               else f"{'meets' if res['passed'] else 'MISSES'} the {res['target']:.0%} target")
    print(f"{group}: MAE {res['mae']:.1%} over {res['n']} published rows (worst {res['max']:.1%}); {verdict}")
print(f"closed-form lower bound on iteration time is {closed_time_s / report.iteration_time_s:.0%} "
      f"of the simulated {report.iteration_time_s:.1f} s; stage-0 activations agree to "
      f"{abs(independent.iloc[1, 2] - 1):.1e} (relative)")
for name, r in whatif.items():
    print(f"what-if {name}: {r.iteration_time_s:.1f} s per iteration, {base_s / r.iteration_time_s:.2f}x")"""),
]


if __name__ == "__main__":
    write(CELLS, OUT)
