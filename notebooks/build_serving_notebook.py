"""Generate notebooks/serving.ipynb from the cell sources below (no outputs).

The notebook is written from this script so that reviews read plain Python, not JSON.
Cells get fixed ids, so regenerating an unchanged notebook changes nothing. Plotting and
table helpers live in `simulator.serving.plots`; cells only call them. The whole notebook
runs in well under a minute on 2 cores (small workloads throughout).

Usage: python notebooks/build_serving_notebook.py
"""

from __future__ import annotations

from pathlib import Path

from nbbuild import write

OUT = Path(__file__).with_name("serving.ipynb")

CELLS: list[tuple[str, str]] = [
    ("md", """\
# Serving: static layouts vs re-sharding, estimated, checked and measured

A serving replica spends its time in two phases that want different parallel layouts. **Prefill**
processes whole prompts: it is compute-bound, and tensor parallelism (TP) pays two all-reduces per
layer for every prompt token, which on PCIe-only GPUs is expensive; pipeline parallelism (PP) only
hands activations between stages. **Decode** produces one token per sequence per step: it is bound by
reading the weights, and TP splits that read across GPUs inside every step, while PP leaves each
step as long as the slowest stage's pass over its micro-batches. Seesaw (Su et al., MLSys'25)
re-shards between a pipeline-heavy prefill layout and a tensor-heavy decode layout, buffering KV in
CPU memory so that it switches rarely. This notebook reads in four steps:

1. **Estimate** - the simulator: output throughput of static layouts and of re-sharding as the
   prefill/decode balance of the workload moves; a timeline of one re-sharding replica; latency
   distributions of two static schedulers under Poisson arrivals.
2. **Independent estimate** - the roofline decode step of FORMULAS.md (Seesaw App. A), from the
   model's shapes and the datasheet alone, against the simulator's step time.
3. **Measurement** - the simulator against published serving measurements (TensorRT-LLM, vLLM).
4. **Measurement on this machine** - the real engine (`executor/serving`, SmolLM2-135M on CPU ranks)
   against the simulator on the same requests, read from the committed benchmark results; and
   prefix caching, estimated as the shared prefix grows, then measured with the engine.
5. **Conclusion** - the numbers above, computed when the notebook runs; nothing typed in by hand.

Everything uses Llama-3 15B-class on one node of 4 L4 GPUs (PCIe only), the smallest of Seesaw's
settings, with small workloads so that the notebook runs in seconds."""),
    ("code", """\
import tempfile
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd

from simulator.serving.measured_plots import (
    comparison_table,
    load_result,
    plot_measured_vs_simulated,
    plot_per_request,
    plot_steps,
    step_table,
)
from simulator.serving.plots import (
    decode_step_check,
    latency_cdfs,
    latency_table,
    phase_summary,
    prefix_caching_sweep,
    throughput_vs_ratio,
    transition_timeline,
)
from simulator.serving.simulate import simulate_serving
from simulator.serving.validation import validate_serving

pd.options.display.float_format = "{:,.3f}".format
RESHARDING = "seesaw pp4 -> tp4"
MODEL, CLUSTER = "llama-3-15b-class", "4xl4"  # the smallest of Seesaw's settings"""),
    ("md", """\
## 1. Estimate: throughput vs the prefill/decode ratio

Offline batches of fixed-length requests whose prompt and output always add up to 1,024 tokens; the
x axis is prompt tokens per generated token. Three static layouts of the 4 GPUs with the vLLM
scheduler (prefill first, whole prompts), and Seesaw's re-sharding deployment from the catalog
(`seesaw-pp4-tp4`: prefill in PP4, decode in TP4, 80 GB CPU KV buffer). Decode-heavy workloads
(left) should favour TP4, prefill-heavy ones (right) PP4; re-sharding should follow the upper
envelope, or rise above it, minus the cost of its transitions."""),
    ("code", """\
layouts = {
    "vllm tp4": {"prefill": {"tp": 4, "pp": 1}, "scheduler": "vllm"},
    "vllm tp2-pp2": {"prefill": {"tp": 2, "pp": 2}, "scheduler": "vllm"},
    "vllm pp4": {"prefill": {"tp": 1, "pp": 4}, "scheduler": "vllm"},
    RESHARDING: "seesaw-pp4-tp4",
}
ratios = [1 / 8, 1 / 4, 1 / 2, 1, 2, 4, 8, 16]
throughput = throughput_vs_ratio(MODEL, CLUSTER, layouts, ratios, num_requests=200)
static_best = throughput.drop(columns=[RESHARDING]).max(axis=1)
throughput["best static"] = throughput.drop(columns=[RESHARDING]).idxmax(axis=1)
throughput["re-sharding / best static"] = throughput[RESHARDING] / static_best
throughput"""),
    ("md", """\
### One re-sharding replica over time

Two hundred arXiv-summarization-like requests (long prompts, short outputs) served by the same
re-sharding deployment, with a Chrome trace written to a temporary folder (open such a trace in
ui.perfetto.dev). The replica prefills in PP4 until the CPU KV buffer is full, copying each prompt's
KV to the CPU as it goes; transitions to TP4 (reloading the weights over PCIe); swaps KV back in and
decodes until the buffer is drained; and transitions back."""),
    ("code", """\
arxiv = {"num_requests": 200, "preset": "arxiv-summarization-like"}
with tempfile.TemporaryDirectory() as tmp:
    trace = Path(tmp) / "seesaw.json"
    seesaw_run = simulate_serving(MODEL, CLUSTER, "seesaw-pp4-tp4", arxiv, trace_path=trace)
    transition_timeline(trace)
    phases = pd.Series(phase_summary(trace), name="seconds on replica 0")
# whole prompts of up to 16,000 tokens must fit one vLLM step
static_run = simulate_serving(MODEL, CLUSTER, {**layouts["vllm tp4"], "max_batched_tokens": 16384}, arxiv)
print(f"re-sharding: {seesaw_run.transitions} transitions taking {seesaw_run.transition_time_s:.1f} s of a "
      f"{seesaw_run.makespan_s:.0f} s run; {seesaw_run.output_tokens_per_s:,.1f} output tokens/s "
      f"vs {static_run.output_tokens_per_s:,.1f} for vllm tp4")
phases.to_frame()"""),
    ("md", """\
### Latency under Poisson arrivals: vLLM vs Sarathi scheduling

Four hundred ShareGPT-like requests arriving at 4 per second on TP4. The vLLM-style scheduler runs a
waiting prompt as soon as it fits, pausing every running decode for a whole prefill step; Sarathi
splits prompts into 512-token chunks mixed into decode steps. Expect Sarathi to trade a longer time
to first token (TTFT) for a steadier time per output token (TPOT)."""),
    ("code", """\
poisson = {"num_requests": 400, "preset": "sharegpt-like", "arrival": {"kind": "poisson", "rate_per_s": 4.0}}
latency = {name: simulate_serving(MODEL, CLUSTER, dep, poisson)
           for name, dep in {"vllm tp4": "vllm-tp4", "sarathi tp4": "sarathi-tp4"}.items()}
latency_cdfs(latency)
plt.tight_layout()
latency_table(latency)"""),
    ("md", """\
## 2. Independent estimate: the roofline decode step

FORMULAS.md (Seesaw App. A) gives a decode step per layer as max(weight read, GEMM FLOPs) plus the
KV read and the TP all-reduces; the helper writes it from the model's shapes and the L4 datasheet,
without the simulator's cost code. The pure roofline (datasheet bandwidth, no overheads) is a lower
bound; with the device's achievable HBM fraction and its fixed per-step overhead it should come close
to the simulator, which also charges per-kernel launches and per-collective latency. Batches of
sequences with 512 cached tokens each, TP4."""),
    ("code", """\
roofline = decode_step_check(MODEL, CLUSTER, tp=4, batches=[1, 8, 32, 128], context=512)
roofline"""),
    ("md", """\
## 3. Measurement: the simulator against published serving numbers

`validate_serving` simulates every published row in `validation/`: TensorRT-LLM's static-batch
output throughput and first-token latency of Llama 7B and 70B on A100 (checks the per-step cost
model), and vLLM serving OPT-13B under Poisson ShareGPT arrivals (checks the scheduler and the KV
capacity). Targets: median absolute error at most 15% on throughput and on median latencies."""),
    ("code", """\
validation = validate_serving()
rows = pd.DataFrame(validation.rows)[["id", "quantity", "unit", "predicted", "measured", "error"]]
display(pd.DataFrame(validation.summary).T)
rows"""),
    ("md", """\
## 4. Measurement on this machine: the real engine against the simulator

`benchmarks/bench_serving_vs_sim.py` serves Poisson workloads (fixed seeds) with the real engine on
SmolLM2-135M (bf16, one thread per rank, gloo between ranks on 127.0.0.1): static TP1, PP2 and TP2 on
short prompts, and on long prompts the static layouts beside re-sharding (PP2 prefill -> TP2 decode).
The simulator serves the very same requests (arrival times, prompt and output lengths from the same
workload specs) on `1xcpu` / `2xcpu` with a profile of the kernels measured at the start of the same
run. This section only reads the committed results (no engine runs here): measured (median over
interleaved repeats, min-max whiskers) beside simulated, then where the engine's time goes per step
kind against the iteration model's time for the same batches. The machine is shared: the load average
recorded with each run says how much of a miss is other work on the 2 cores (rank 0's CPU time in
the steps, below, is what the engine's thread actually got)."""),
    ("code", """\
measured = load_result(Path("..") / "benchmarks" / "results" / "serving_vs_sim.json")
print(f"measured {measured['timestamp']} on {measured['machine']['cpu_model']} ({measured['machine']['cpu_count']} cores), "
      f"load average {measured['load_average_1min']['before']:.1f} before, {measured['load_average_1min']['after']:.1f} after; "
      f"targets: throughput within {measured['targets']['throughput']:.0%}, latency within {measured['targets']['latency']:.0%}")
plot_measured_vs_simulated(measured)
plt.tight_layout()
comparison = comparison_table(measured)
comparison"""),
    ("code", """\
plot_steps(measured)
plt.tight_layout()
step_table(measured)"""),
    ("md", """\
Request by request: each request's simulated TTFT and TPOT against its measured ones. Points in the
grey band are predicted within the latency target. TPOT on the long-prompt load splits into two
clusters, decodes that a later arrival's prefill interrupted and decodes it did not; a percentile
that falls between the clusters misses when a few requests land on the other side of the split."""),
    ("code", """\
if any("per_request" in r for r in measured["rows"]):
    plot_per_request(measured)
    plt.tight_layout()"""),
    ("md", """\
## 4b. Prefix caching: what if prompts share a system prompt

Estimate first: one replica (vllm, tp4) serving chat requests that open with one of 4 system prompts
of growing length, prefix caching off and on. Off, every prompt's prefix is prefilled again and TTFT
grows with it; on, each group's prefix is computed once and later prompts start after it. Then the
measurement: `benchmarks/bench_serving_prefix.py` ran the real engine both ways on this machine,
beside the simulator's prediction of both (read from the committed results)."""),
    ("code", """\
chat = {"num_requests": 200, "arrival": {"kind": "poisson", "rate_per_s": 4.0},
        "input_tokens": {"distribution": "uniform", "min": 32, "max": 256},
        "output_tokens": {"distribution": "uniform", "min": 32, "max": 256},
        "shared_prefix": {"tokens": 16, "groups": 4}, "seed": 0}
prefix_sweep = prefix_caching_sweep(MODEL, CLUSTER, {"prefill": {"tp": 4}, "scheduler": "vllm"}, chat,
                                    [16, 512, 1024, 2048, 4096])
plt.tight_layout()
prefix_sweep"""),
    ("code", """\
prefix = load_result(Path("..") / "benchmarks" / "results" / "serving_prefix.json")
prefix_rows = pd.DataFrame([{"prefix caching": "on" if r["prefix_caching"] else "off",
                             "cached prompt tokens (measured)": r["measured"]["cached_prompt_tokens"],
                             "cached prompt tokens (simulated)": r["simulated"]["cached_prompt_tokens"],
                             **{f"{k} measured": r["measured"][k]["median"] for k in ("ttft_p50_s", "tpot_p50_s")},
                             **{f"{k} simulated": r["simulated"][k] for k in ("ttft_p50_s", "tpot_p50_s")}}
                            for r in prefix["rows"]]).set_index("prefix caching")
display(pd.DataFrame(prefix["speedup"]).T.rename(columns=lambda c: c + " (on / off)"))
prefix_rows"""),
    ("md", """\
## 5. Conclusion

Computed from the cells above. The throughput ratios are simulator predictions for one small
setting, not measurements; the validation errors say how far the simulator has been from published
measurements on the rows it was checked against."""),
    ("code", """\
gain = throughput["re-sharding / best static"]
print(f"{MODEL} on {CLUSTER}: the best static layout is {throughput['best static'].iloc[0]} at input/output = "
      f"{ratios[0]:g} and {throughput['best static'].iloc[-1]} at {ratios[-1]:g}; re-sharding over the best static "
      f"layout: {gain.min():.2f}x to {gain.max():.2f}x (at {gain.idxmax():g}), above it at "
      f"{int((gain > 1).sum())} of {len(gain)} ratios")
print(f"re-sharding on {arxiv['num_requests']} arXiv-like requests: {seesaw_run.transitions} transitions, "
      f"{seesaw_run.transition_time_s / seesaw_run.makespan_s:.1%} of the run; "
      f"{seesaw_run.output_tokens_per_s / static_run.output_tokens_per_s:.2f}x the output throughput of vllm tp4")
v, s = latency["vllm tp4"], latency["sarathi tp4"]
print(f"Sarathi vs vLLM at 4 requests/s: TPOT p99 {s.tpot_s['p99'] / v.tpot_s['p99']:.2f}x, "
      f"TTFT p99 {s.ttft_s['p99'] / v.ttft_s['p99']:.2f}x")
sim_over = roofline["simulator / achievable roofline"]
print(f"decode step: simulator is {roofline['simulator / datasheet roofline'].min():.2f}x-"
      f"{roofline['simulator / datasheet roofline'].max():.2f}x the pure roofline and {sim_over.min():.2f}x-"
      f"{sim_over.max():.2f}x the roofline with achievable bandwidth and step overhead")
ttft = prefix_sweep["TTFT p50 (s)"]
print(f"prefix caching, simulated: with {ttft.index[-1]} shared tokens TTFT p50 {ttft['on'].iloc[-1]:.3f} s cached "
      f"against {ttft['off'].iloc[-1]:.3f} s not; measured on this machine "
      f"{prefix['speedup']['measured']['ttft_p50_s']:.2f}x TTFT p50 with caching, simulated "
      f"{prefix['speedup']['simulated']['ttft_p50_s']:.2f}x")
within = comparison["within target"]
print(f"this machine, real engine vs simulator: {int(within.sum())} of {len(within)} measured numbers within target "
      f"(throughput errors {', '.join(f'{e:+.0%}' for e in comparison.xs('output tokens/s', level='metric')['error'])})")
seesaw = measured["seesaw"]
if seesaw.get("measured"):
    print(f"Seesaw for real: {seesaw['resharding']} at {seesaw['measured']['speedup']:.2f}x the best static layout "
          f"({seesaw['measured']['best_static']}) measured; the simulator predicted {seesaw['simulated']['speedup']:.2f}x "
          f"(vs {seesaw['simulated']['best_static']})")
for group, g in validation.summary.items():
    target = "no target" if g["target"] is None else (
        f"target {g['target']:.0%}: {'met' if g['passed'] else 'NOT met'}")
    print(f"validation, {group}: median |error| {g['median_abs_error']:.1%} over {g['n']} rows "
          f"(max {g['max']:.1%}; {target})")"""),
]


if __name__ == "__main__":
    write(CELLS, OUT)
