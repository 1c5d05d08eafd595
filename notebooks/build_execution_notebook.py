"""Generate notebooks/execution.ipynb from the cell sources below (no outputs).

The notebook reads the committed executor benchmark (`benchmarks/results/training_executor.json`)
and runs one tiny plan itself (two gloo ranks, a few seconds), so a reader sees both the
committed measurements and the runner at work.

Usage: python notebooks/build_execution_notebook.py
"""

from __future__ import annotations

from pathlib import Path

from nbbuild import write

OUT = Path(__file__).with_name("execution.ipynb")

CELLS: list[tuple[str, str]] = [
    ("md", """\
# Running plans: measured against predicted

The simulator predicts a training step; `executor.training.run_training` runs the same plan on
real ranks (torch.distributed: gloo on CPU, NCCL on GPU; DDP, ZeRO-1/2/3 and HSDP with FSDP2,
tensor parallel with DTensor, pipelines with `torch.distributed.pipelining`, activation
checkpointing) and measures it. On this machine a device is one CPU core: the `1xcpu` and
`2xcpu` clusters, whose costs come from the committed measured profile.

1. **One run, here**: a tiny GPT on two data-parallel ranks, measured and predicted.
2. **The benchmark**: ten plans of a small GPT and a small Llama, measured vs predicted, and
   where the prediction is off.
3. **The tuner's choice, run**: does the plan the tuner prefers also run faster?
4. **Conclusion**, computed from the numbers above."""),
    ("code", """\
import json
from pathlib import Path

import pandas as pd

from executor.training.run import run_training

ROOT = Path.cwd().parent if Path.cwd().name == "notebooks" else Path.cwd()
pd.options.display.float_format = "{:,.3f}".format"""),
    ("md", "## 1. One run, here"),
    ("code", """\
plan = {"tp": 1, "pp": 1, "dp": 2, "micro_batch_size": 2, "global_batch_size": 8, "zero_stage": 0,
        "fused_elementwise": False}
run = run_training("gpt-debug", "2xcpu", plan, steps=3, warmup=1, compare=True)
pd.Series({"measured step (s)": run.step_time_s, "predicted step (s)": run.predicted_step_time_s,
           "error": run.error, "loss first -> last": f"{run.losses[0]:.3f} -> {run.losses[-1]:.3f}"})"""),
    ("md", """\
A debug-sized model is dominated by fixed costs (Python, gloo latency) that the simulator
prices only roughly; the benchmark below uses models whose steps take a good fraction of a
second."""),
    ("md", "## 2. The benchmark: measured vs predicted"),
    ("code", """\
bench = json.loads((ROOT / "benchmarks/results/training_executor.json").read_text())
rows = [r for r in bench["rows"] if "error" in r]
table = pd.DataFrame([{"plan": r["label"], "cluster": r["cluster"], "measured s": r["measured_s"],
                       "predicted s": r["predicted_s"], "error": r["error"]} for r in rows])
table"""),
    ("code", """\
ax = table.plot.scatter(x="measured s", y="predicted s", figsize=(4.5, 4))
top = max(table["measured s"].max(), table["predicted s"].max()) * 1.1
ax.plot([0, top], [0, top], "k--", lw=1)
ax.fill_between([0, top], [0, top * 0.8], [0, top * 1.2], color="k", alpha=0.08)
ax.set_title("step time: predicted vs measured (±20%)");"""),
    ("md", "Where the prediction's time goes, per plan (the simulator's breakdown, seconds):"),
    ("code", """\
pd.DataFrame({r["label"]: {k: v for k, v in r["breakdown"].items() if v > 0} for r in rows}).T.fillna(0.0)"""),
    ("md", "## 3. The tuner's choice, run"),
    ("code", """\
choice = bench.get("tuner_choice") or {}
pd.DataFrame({name: {"measured s": c.get("measured_s"), "predicted s": c.get("predicted_s")}
              for name, c in choice.items() if isinstance(c, dict) and "plan" in c}).T"""),
    ("md", "## 4. Conclusion"),
    ("code", """\
s = bench["summary"]
print(f"{s['run']} of {s['plans']} plans ran; median |error| of the predicted step time: {s['median_abs_error']:.1%} "
      f"(target <= {bench['target_median_abs_error']:.0%}).")
if "measured_speedup" in choice:
    print(f"Tuned vs Megatron-LM-space plan on 2xcpu: predicted {choice['predicted_speedup']:.3f}x, "
          f"measured {choice['measured_speedup']:.3f}x; the order {'agrees' if choice['order_agrees'] else 'disagrees'}.")"""),
]


if __name__ == "__main__":
    write(CELLS, OUT)
