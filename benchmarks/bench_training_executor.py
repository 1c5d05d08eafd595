"""Run training plans on this machine and compare the measured step time with the simulator's.

(a) Plans of a small GPT and a small Llama (about 25M parameters each: 6 layers, hidden 512,
    sequence 256, vocab 8192) on `1xcpu` and `2xcpu` (one core and one thread per rank, gloo
    on loopback), covering data parallel (ZeRO 0-3), pipeline parallel, tensor parallel and
    activation checkpointing. Each runs through `executor.training.run_training` (bf16, 2
    warm-up steps, then the median of the timed steps of the slowest rank) and is predicted by
    `simulate_training` on the same cluster with its committed CPU profile. Target: median
    |error| <= 20%.
(b) The tuner's choice, run: `tune_training` for the Llama on `2xcpu`, then the tuned plan and
    the best Megatron-LM-space plan are both run; does the measured order agree with the
    predicted one, and what is the measured speedup?

Usage: python benchmarks/bench_training_executor.py [--quick] [--out PATH] [--markdown-only]
Writes benchmarks/results/training_executor.json and .md atomically.
"""

from __future__ import annotations

import statistics
import sys
from typing import Any

import common

from executor.training.run import run_training
from simulator.errors import SpecError
from simulator.specs.model import TransformerSpec
from tuner.training import tune_training

DEFAULT_OUT = common.RESULTS / "training_executor.json"
TARGET = 0.20
SEQ = 256
GPT = TransformerSpec.parse({
    "name": "gpt-25m", "num_layers": 6, "hidden_size": 512, "num_attention_heads": 8, "vocab_size": 8192,
    "seq_length": SEQ, "activation": "gelu", "norm": "layernorm", "bias": True, "position_embedding": "learned",
    "tied_embeddings": True, "dropout": True, "source": "a small GPT for the executor benchmark"})
LLAMA = TransformerSpec.parse({
    "name": "llama-25m", "num_layers": 6, "hidden_size": 512, "num_attention_heads": 8, "num_kv_heads": 4,
    "ffn_hidden_size": 1408, "vocab_size": 8192, "seq_length": SEQ, "activation": "swiglu", "norm": "rmsnorm",
    "bias": False, "position_embedding": "rope", "tied_embeddings": False, "dropout": False,
    "source": "a small Llama for the executor benchmark"})
BASE = {"tp": 1, "pp": 1, "dp": 1, "micro_batch_size": 2, "global_batch_size": 8, "schedule": "1f1b",
        "zero_stage": 0, "recompute": "none", "fused_elementwise": False}
PLANS: list[tuple[str, TransformerSpec, str, dict[str, Any]]] = [
    ("gpt single", GPT, "1xcpu", {}),
    ("gpt single, full recompute", GPT, "1xcpu", {"recompute": "full"}),
    ("gpt dp2", GPT, "2xcpu", {"dp": 2}),
    ("gpt dp2 zero3", GPT, "2xcpu", {"dp": 2, "zero_stage": 3}),
    ("gpt pp2 1f1b", GPT, "2xcpu", {"pp": 2, "micro_batch_size": 1}),
    ("llama single", LLAMA, "1xcpu", {}),
    ("llama dp2 zero1", LLAMA, "2xcpu", {"dp": 2, "zero_stage": 1}),
    ("llama dp2 zero2, full recompute", LLAMA, "2xcpu", {"dp": 2, "zero_stage": 2, "recompute": "full"}),
    ("llama pp2 gpipe", LLAMA, "2xcpu", {"pp": 2, "micro_batch_size": 1, "schedule": "gpipe"}),
    ("llama tp2", LLAMA, "2xcpu", {"tp": 2}),
]
QUICK = ("gpt single", "gpt dp2", "llama pp2 gpipe")


def run_plan(label: str, model: TransformerSpec, cluster: str, plan: dict[str, Any], steps: int) -> dict[str, Any]:
    full = {**BASE, **plan, "name": label}
    try:
        r = run_training(model, cluster, full, steps=steps, warmup=2, compare=True)
    except SpecError as err:  # a plan the runner cannot express: reported, never hidden
        print(f"  {label}: not run: {err}", file=sys.stderr)
        return {"label": label, "model": model.name, "cluster": cluster, "plan": full, "skipped": str(err)}
    row = {"label": label, "model": model.name, "cluster": cluster, "plan": full,
           "measured_s": r.step_time_s, "p10_s": r.step_time_p10_s, "p90_s": r.step_time_p90_s,
           "predicted_s": r.predicted_step_time_s, "error": r.error, "breakdown": r.predicted_breakdown,
           "peak_memory_bytes": r.peak_memory_bytes, "predicted_peak_memory_bytes": r.predicted_peak_memory_bytes,
           "losses": r.losses, "parameters": r.parameters, "cost_sources": r.cost_sources}
    print(f"  {label} on {cluster}: measured {r.step_time_s:.3f} s, predicted {r.predicted_step_time_s:.3f} s "
          f"({r.error:+.1%})", file=sys.stderr)
    return row


def tuned_vs_megatron(model: TransformerSpec, steps: int) -> dict[str, Any]:
    result = tune_training(model, "2xcpu", BASE["global_batch_size"], SEQ)
    plans = {"tuned": result.best.plan}
    if "megatron" in result.baselines and result.baselines["megatron"] is not None:
        plans["megatron"] = result.baselines["megatron"].plan
    # the runner is eager PyTorch (one kernel per element-wise op): predict both plans as it runs them
    plans = {name: plan.model_copy(update={"fused_elementwise": False}) for name, plan in plans.items()}
    out: dict[str, Any] = {"model": model.name, "cluster": "2xcpu"}
    for name, plan in plans.items():
        try:
            r = run_training(model, "2xcpu", plan, steps=steps, warmup=2, compare=True)
            out[name] = {"plan": plan.to_dict(), "measured_s": r.step_time_s, "predicted_s": r.predicted_step_time_s,
                         "error": r.error}
        except SpecError as err:
            out[name] = {"plan": plan.to_dict(), "skipped": str(err)}
    t, m = out.get("tuned", {}), out.get("megatron", {})
    if "measured_s" in t and "measured_s" in m:
        out["predicted_speedup"] = m["predicted_s"] / t["predicted_s"]
        out["measured_speedup"] = m["measured_s"] / t["measured_s"]
        out["order_agrees"] = (m["measured_s"] >= t["measured_s"]) == (m["predicted_s"] >= t["predicted_s"])
    return out


def run(quick: bool) -> dict[str, Any]:
    steps = 3 if quick else 5
    rows = [run_plan(label, model, cluster, plan, steps) for label, model, cluster, plan in PLANS
            if not quick or label in QUICK]
    measured = [r for r in rows if "error" in r]
    summary = {"plans": len(rows), "run": len(measured),
               "median_abs_error": statistics.median(abs(r["error"]) for r in measured) if measured else None}
    choice = None if quick else tuned_vs_megatron(LLAMA, steps)
    return {**common.run_fields("training_executor", quick, {"timed_steps": steps, "warmup_steps": 2}),
            "target_median_abs_error": TARGET, "rows": rows, "summary": summary, "tuner_choice": choice}


def markdown(result: dict[str, Any]) -> str:
    s = result["summary"]
    lines = ["# Training executor: measured vs predicted step time on this machine's CPU", "",
             f"{s['run']} of {s['plans']} plans run; median |error| of the predicted step time "
             f"{s['median_abs_error']:.1%} (target <= {result['target_median_abs_error']:.0%}), with the committed "
             "CPU profile.", "",
             "| plan | model | cluster | measured s (p10-p90) | predicted s | error | largest predicted parts |",
             "|---|---|---|---:|---:|---:|---|"]
    for r in result["rows"]:
        if "skipped" in r:
            lines.append(f"| {r['label']} | {r['model']} | {r['cluster']} | not run | | | {r['skipped']} |")
            continue
        parts = sorted(((v, k) for k, v in r["breakdown"].items() if k != "total" and v > 0), reverse=True)[:3]
        lines.append(f"| {r['label']} | {r['model']} | {r['cluster']} | {r['measured_s']:.3f} "
                     f"({r['p10_s']:.3f}-{r['p90_s']:.3f}) | {r['predicted_s']:.3f} | {r['error']:+.1%} | "
                     + ", ".join(f"{k} {v:.3f}" for v, k in parts) + " |")
    c = result.get("tuner_choice")
    if c and "measured_speedup" in c:
        lines += ["", f"Tuner's choice on 2xcpu ({c['model']}): the tuned plan is predicted "
                  f"{c['predicted_speedup']:.2f}x faster than the best Megatron-LM-space plan and measured "
                  f"{c['measured_speedup']:.2f}x; the measured order {'agrees' if c['order_agrees'] else 'disagrees'}."]
    elif c:
        lines += ["", f"Tuner's choice on 2xcpu: not both plans ran ({c})."]
    lines.append("")
    return "\n".join(lines)


def main() -> None:
    p = common.parser(__doc__.splitlines()[0], "3 plans, 3 timed steps, no tuner comparison", DEFAULT_OUT)
    args = p.parse_args()
    if args.markdown_only:
        common.rewrite_markdown(args.out, markdown)
        return
    result = run(args.quick)
    print(f"median |error| {result['summary']['median_abs_error']:.1%} over {result['summary']['run']} plans")
    common.write_results(result, args.out, markdown)


if __name__ == "__main__":
    main()
