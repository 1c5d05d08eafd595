"""Generate notebooks/profiling.ipynb from the cell sources below (no outputs).

The notebook reads the committed CPU profile (`simulator/specs/catalog/profiles/cpu-epyc-1t`)
and the committed fidelity benchmark (`benchmarks/results/profile_fidelity.json`); it measures
nothing itself, so it runs in seconds. Helpers live in `profiler.report`.

Usage: python notebooks/build_profiling_notebook.py
"""

from __future__ import annotations

from pathlib import Path

from nbbuild import write

OUT = Path(__file__).with_name("profiling.ipynb")

CELLS: list[tuple[str, str]] = [
    ("md", """\
# Profiling: measured costs instead of datasheet peaks

Every prediction of simtune rests on a device's costs: how fast its GEMMs, attention kernels and
memory-bound kernels run, how fast it copies and communicates, and how long an engine step takes.
Without a profile these come from the datasheet and hand-set efficiencies. `simtune profile`
measures them on the machine at hand and fits a small physical model to each family; every
`simulate`, `tune` and `validate` command then takes `--profile DIR`, and a cluster spec can name
its profile. This notebook reads the committed profile of the CPU simtune is developed on (one
core = one rank, the `cpu` device of the `1xcpu` / `2xcpu` clusters):

1. **Measured efficiency** against the datasheet roofline, per op family.
2. **Fit quality**: each fit's median error on held-out shapes.
3. **What changes**: one prediction with the datasheet and with the profile, and which cost came
   from where.
4. **Does it hold?** Real torch transformer layers and SmolLM2 decode steps, measured against
   the simulator's prediction with and without the profile.
5. **Conclusion**, computed from the numbers above."""),
    ("code", """\
import json
from pathlib import Path

import pandas as pd

from profiler.report import fit_report, fits_frame, plot_efficiency, plot_fidelity
from simulator.specs.catalog import load_cluster, load_model
from simulator.training import simulate_training

PROFILE = "cpu-epyc-1t"
ROOT = Path.cwd().parent if Path.cwd().name == "notebooks" else Path.cwd()
pd.options.display.float_format = "{:,.3g}".format"""),
    ("md", """\
## 1. Measured efficiency vs the datasheet roofline

Each point is one measured shape: achieved FLOP/s (or bytes/s) over the datasheet peak of the
`cpu` device (Zen 5 core: 128 bf16 / 64 fp32 FLOP per cycle at 4.1 GHz, 50 GB/s of memory
bandwidth). Lines are the fitted models."""),
    ("code", """\
report = fit_report(PROFILE)
fig = plot_efficiency(report["profile"])"""),
    ("md", "## 2. Fit quality on held-out shapes (GroupKFold over shapes, never over repetitions)"),
    ("code", """\
fits = fits_frame(report)
fits[fits.part == "all"]"""),
    ("md", "## 3. One prediction, datasheet vs measured"),
    ("code", """\
model = load_model("gpt3-125m")
plan = {"tp": 1, "pp": 1, "dp": 1, "micro_batch_size": 2, "global_batch_size": 8, "seq_length": 512,
        "fused_elementwise": False}
runs = {source: simulate_training(model, load_cluster("1xcpu", profile=profile), plan)
        for source, profile in (("datasheet", "none"), ("measured", PROFILE))}
pd.DataFrame({source: {"iteration time (s)": r.iteration_time_s, "tokens/s": r.tokens_per_s, "MFU": r.mfu,
                       **{f"source: {k}": v for k, v in r.cost_sources.items()}}
              for source, r in runs.items()})"""),
    ("md", """\
## 4. Does it hold? Predicted vs measured on this machine

`benchmarks/bench_profile_fidelity.py` times real eager torch layers (GPT and Llama blocks, bf16,
forward + backward) and SmolLM2-135M decode steps at batch 1-32, and compares them with the
simulator's prediction on `1xcpu`, with the committed profile and with the datasheet alone."""),
    ("code", """\
fidelity = json.loads((ROOT / "benchmarks/results/profile_fidelity.json").read_text())
fig = plot_fidelity(fidelity)
pd.DataFrame(fidelity["layers"])[["model", "micro_batch", "seq", "measured_s", "profile_s", "profile_error",
                                  "datasheet_error"]]"""),
    ("code", """\
pd.DataFrame(fidelity["decode"])[["batch", "context", "measured_s", "profile_s", "profile_error", "datasheet_error"]]"""),
    ("md", "## 5. Conclusion"),
    ("code", """\
s = fidelity["summary"]
gemm = report["fits"]["gemm"]["cv_median_abs_error"]
speed = runs["datasheet"].iteration_time_s / runs["measured"].iteration_time_s
print(f"GEMM fit: {gemm:.1%} median error on held-out shapes.")
print(f"GPT-3 125M on one core: the datasheet predicts {runs['datasheet'].iteration_time_s:.2f} s per iteration, "
      f"the profile {runs['measured'].iteration_time_s:.2f} s ({speed:.2f}x).")
print(f"Transformer layers: median |error| {s['layers_profile_median_abs_error']:.1%} with the profile, "
      f"{s['layers_datasheet_median_abs_error']:.1%} with the datasheet alone.")
print(f"SmolLM2 decode steps: {s['decode_profile_median_abs_error']:.1%} with the profile, "
      f"{s['decode_datasheet_median_abs_error']:.1%} with the datasheet alone.")"""),
]


if __name__ == "__main__":
    write(CELLS, OUT)
