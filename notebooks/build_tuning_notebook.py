"""Generate notebooks/training_tuning.ipynb from the cell sources below (no outputs).

The notebook is written from this script so that reviews read plain Python, not JSON.
Cells get fixed ids, so regenerating an unchanged notebook changes nothing. Plotting and
table helpers live in `tuner.training.report_plots`; cells only call them.

Usage: python notebooks/build_tuning_notebook.py
"""

from __future__ import annotations

from pathlib import Path

from nbbuild import write

OUT = Path(__file__).with_name("training_tuning.ipynb")

CELLS: list[tuple[str, str]] = [
    ("md", """\
# Training tuner: estimate, check, measure

Given a model, a cluster and a global batch, which parallel plan trains fastest *and fits in
memory*? `tune_training` searches the space of Mist (Zhu et al., EuroSys'25): the global layout
(TP x PP x DP, micro-batch, interleaving, sequence parallelism, selective recompute) and, for every
pipeline stage separately, its layer count, ZeRO stage, offloaded fractions of weights, gradients,
optimizer states and activations, and checkpointed layers. This notebook reads in four steps:

1. **Estimate** - the tuned plan for a memory-constrained case against the best plans of two
   baselines searched on the same simulator (Megatron-LM's knobs; an Aceso-style bottleneck search).
2. **Independent check** - on a tiny model, exhaustive search over the same space (no Pareto
   frontiers, no sampling, no MILP) against what the tuner finds.
3. **Measurement** - how long tuning takes as the cluster grows.
4. **Conclusion** - the numbers above, computed when the notebook runs; nothing is typed in by hand."""),
    ("code", """\
import pandas as pd

from simulator.specs.catalog import load_cluster, load_model
from tuner.training import tune_training
from tuner.training.exhaustive import exhaustive_best
from tuner.training.report_plots import (
    comparison_table,
    evaluator_for,
    plot_plan_comparison,
    plot_stage_frontier,
    plot_tuning_time,
)

pd.options.display.float_format = "{:,.3f}".format
MODEL, CLUSTER, BATCH, SEQ = "llama-2-7b", "8xl4", 128, 2048"""),
    ("md", """\
## 1. Estimate: Llama-2 7B on one node of 8 L4 GPUs

With mixed-precision Adam a model carries about 16 bytes of state per parameter (Rajbhandari et al.,
ZeRO, SC'20): for 7B parameters, several times what one L4 holds. The plan has to shard, offload,
split into stages or recompute, and every way of doing so costs time somewhere.
The tuner screens every legal layout, solves the inter-stage MILP for the most promising ones and
re-simulates the best solutions with the discrete-event simulator. The baselines search their own,
smaller spaces on the same simulator: Megatron-LM (uniform stages, recompute none / selective / full,
distributed optimizer or not, no offload) exhaustively; the Aceso-style search from Megatron-LM's best
plans, moving layers and checkpointing off the bottleneck stage and trading TP for DP.
Iteration times are the discrete-event simulator's; "closed form" is the tuner's own estimate."""),
    ("code", """\
result = tune_training(MODEL, CLUSTER, BATCH, SEQ)
plans = {"tuned": result.best, "Megatron-LM": result.baselines["megatron"],
         "Aceso-style": result.baselines["aceso"]}
print(f"searched {result.search.layouts} layouts, {result.search.evaluated:,} stage options "
      f"({result.search.feasible:,} fit), {result.search.milps} MILPs in {result.search.seconds:.1f} s")
comparison_table(plans)"""),
    ("md", """\
Where the difference comes from, stage by stage: the time each stage's compute stream is busy per
iteration, and each stage's peak memory against the device's (dashed)."""),
    ("code", """\
plot_plan_comparison(plans);"""),
    ("md", """\
### One stage's options and their Pareto frontier

Per stage, every combination of ZeRO stage, offload fractions and checkpointed layers is a point:
**T**, the time of one micro-batch on the stage (forward, backward, recompute, offload stalls), and
**D**, what the stage adds at the end of the batch (exposed gradient sync, optimizer step, parameter
all-gather). Options that do not fit in memory are grey. Among those that fit, only the (T, D) Pareto
frontier can be part of an optimal plan; the inter-stage MILP chooses one frontier point per stage
and the layer counts. The star is the tuned plan's choice for its first stage."""),
    ("code", """\
tuned_plan = result.best.plan
evaluator = evaluator_for(MODEL, CLUSTER, tuned_plan)
plot_stage_frontier(evaluator, tuned_plan.stages[0].layers, 0, chosen=tuned_plan.stages[0]);"""),
    ("md", """\
## 2. Independent check: exhaustive search on a tiny model

Frontiers are sampled to a few points and only the best screened layouts get a MILP, so the tuner
could miss the optimum. On a 6-layer debug model on 2 GPUs with 1.5 MiB of device memory (so tight
that stages must differ), `exhaustive_best` scores *every* combination of every stage's options for
every layer split and layout with the same closed form. The tuner's closed-form time should match it,
and its plan, re-simulated event by event, should match its closed form. The baselines' spaces, without
offloading or per-stage choices, may hold no plan that fits at all."""),
    ("code", """\
tiny_model = load_model("gpt-debug").model_copy(update={"num_layers": 6, "name": "gpt-debug-6"})
base = load_cluster("2xa100-80gb")
tiny_cluster = base.model_copy(update={"device": base.device.model_copy(update={"memory_GiB": 1.5 / 1024})})
exhaustive_s, exhaustive_layout = exhaustive_best(tiny_model, tiny_cluster, 16, tiny_model.seq_length)
tiny = tune_training(tiny_model, tiny_cluster, 16)
check = pd.DataFrame({
    "iteration time (ms)": {
        "exhaustive optimum (closed form)": exhaustive_s * 1e3,
        "tuner (closed form)": tiny.best.analytic_time_s * 1e3,
        "tuner (discrete-event)": tiny.best.report.iteration_time_s * 1e3,
    }})
check["/ exhaustive"] = check.iloc[:, 0] / (exhaustive_s * 1e3)
print(f"exhaustive optimum's layout: {exhaustive_layout.describe()}")
check"""),
    ("code", """\
comparison_table({"tuned": tiny.best, **{f"{k} baseline": v for k, v in tiny.baselines.items()}},
                 time_unit="ms", memory_unit="MiB")"""),
    ("md", """\
## 3. Measurement: tuning time as the cluster grows

GPT-3 13B with a global batch of 512 on 8 to 128 A100-40GB GPUs, baselines off. More GPUs means more
ways to factor them into TP x PP x DP, so more layouts, and more stages per layout; the question is
whether the search stays in seconds. (The benchmark `benchmarks/bench_training_tuner.py` times
GPT-3 175B on 1024 GPUs.)"""),
    ("code", """\
scaling = []
for gpus, cluster in [(8, "8xa100-40gb"), (16, "2x8xa100-40gb"), (32, "4x8xa100-40gb"),
                      (64, "8x8xa100-40gb"), (128, "16x8xa100-40gb")]:
    r = tune_training("gpt3-13b", cluster, 512, baselines=())
    scaling.append({"gpus": gpus, "seconds": r.search.seconds, "layouts": r.search.layouts,
                    "evaluations": r.search.evaluated, "MILPs": r.search.milps,
                    "evaluations/s": r.search.evaluated / r.search.seconds,
                    "iteration (s)": r.best.report.iteration_time_s, "MFU": r.best.report.mfu})
scaling = pd.DataFrame(scaling)
plot_tuning_time(scaling.to_dict("records"))
scaling"""),
    ("md", """\
## 4. Conclusion

The cell below states the results from the numbers computed above: the tuned plan's speedup over
each baseline on the memory-constrained case, and how far its closed form is from the discrete-event
simulation; how close the tuner comes to the exhaustive optimum on the tiny case; and how tuning time
grows with the cluster. The speedups are simulator predictions, not measurements on hardware."""),
    ("code", """\
tuned_s = result.best.report.iteration_time_s
print(f"{MODEL} on {CLUSTER}, batch {BATCH}: tuned plan {tuned_s:.2f} s per iteration "
      f"(closed form {result.best.analytic_time_s / tuned_s - 1:+.1%} off the simulation)")
for name, base in plans.items():
    if name != "tuned":
        print(f"  over {name}: " + ("no fitting plan" if base is None else
                                   f"{base.report.iteration_time_s / tuned_s:.2f}x "
                                   f"({base.report.iteration_time_s:.2f} s)"))
print(f"tiny case: tuner's closed form is {tiny.best.analytic_time_s / exhaustive_s:.4f}x the exhaustive "
      f"optimum; discrete-event / closed form = {tiny.best.report.iteration_time_s / tiny.best.analytic_time_s:.4f}")
lo, hi = scaling.iloc[0], scaling.iloc[-1]
print(f"tuning gpt3-13b: {lo.seconds:.1f} s on {lo.gpus:.0f} GPUs to {hi.seconds:.1f} s on {hi.gpus:.0f} GPUs "
      f"({hi.seconds / lo.seconds:.1f}x the time for {hi.gpus / lo.gpus:.0f}x the GPUs; "
      f"{scaling['evaluations/s'].median():,.0f} stage-option evaluations/s median)")"""),
]


if __name__ == "__main__":
    write(CELLS, OUT)
