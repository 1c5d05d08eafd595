"""Benchmark the training tuner: how fast it searches, and how much it beats the baselines.

(a) Tuning time for GPT-3 175B on 1024 A100-80GB (global batch 1536, default search settings,
    baselines off), median of 3 runs after a warm-up that pays the one-time cost-model
    compile; with layouts, stage-option evaluations and evaluations per second. Baseline
    measured in the same run: the Megatron-LM baseline search alone on the same case
    (`megatron_baseline`: exhaustive over Megatron-LM's smaller space, best 3 re-simulated).
    Targets (issue): <= 60 s on a 2-core machine, aim 10 s.
(b) The Mist evaluation grid (Zhu et al., EuroSys'25, Sec. 7): GPT-3-style and Llama models
    from 1.3B to 22B parameters on 2 to 32 GPUs (L4 with sequence 2048, A100-40GB with
    sequence 4096), global batch 16 x GPUs. Every case is tuned with both baselines; the
    speedup of the tuned plan over each baseline is the ratio of their simulated iteration
    times. Mist's published average speedups on real hardware (1.28x over Megatron-LM,
    1.27x over Aceso) are printed beside ours for reference only: they are measurements of
    a different system, not ours.

Usage: python benchmarks/bench_training_tuner.py [--quick] [--out PATH] [--markdown-only]
Writes JSON (default benchmarks/results/training_tuner.json) atomically, and the grid as a
markdown table (benchmarks/results/training_tuner.md) generated from that JSON.
"""

from __future__ import annotations

import collections
import math
import statistics
import sys
import time

import common
from common import md_escape, timed

from simulator.errors import InfeasiblePlan
from simulator.specs.catalog import load_cluster, load_model
from simulator.specs.plan import TrainingPlan
from tuner.training import tune_training
from tuner.training.baselines import megatron_baseline

DEFAULT_OUT = common.RESULTS / "training_tuner.json"

LARGE = {"model": "gpt3-175b", "cluster": "128x8xa100-80gb", "global_batch_size": 1536, "seq_length": 2048}
WARMUP = {"model": "gpt-debug", "cluster": "2xa100-80gb", "global_batch_size": 8}
TARGET_S, AIM_S = 60.0, 10.0

GPT_MODELS = ("gpt3-1.3b", "gpt3-2.7b", "gpt3-6.7b", "gpt3-13b", "megatron-gpt-22b")
LLAMA_MODELS = ("llama-1.3b", "llama-2.7b", "llama-2-7b", "llama-2-13b", "llama-22b")
SIZES = ((2, 32), (4, 64), (8, 128), (16, 256), (32, 512))  # (GPUs, global batch); i-th model
HARDWARE = {  # name: (cluster per size, sequence length)
    "L4": (("2xl4", "4xl4", "8xl4", "2x8xl4", "4x8xl4"), 2048),
    "A100-40GB": (("2xa100-40gb", "4xa100-40gb", "8xa100-40gb", "2x8xa100-40gb", "4x8xa100-40gb"), 4096),
}
BASELINES = ("megatron", "aceso")
BASELINE_LABELS = {"megatron": "Megatron-LM", "aceso": "Aceso-style"}
MIST_PUBLISHED = {"megatron": 1.28, "aceso": 1.27}  # Zhu et al. EuroSys'25, abstract: average speedups
GAP_FLAG = 0.05  # flag analytic vs discrete-event gaps above this

# Repetitions: full run, and --quick.
REPS = {"large": (3, 1)}


def grid_cases(num_sizes: int) -> list[dict]:
    """The i-th model of each family on the i-th (GPUs, batch) size, for each hardware."""
    cases = []
    for hw, (clusters, seq) in HARDWARE.items():
        for family, models in (("GPT", GPT_MODELS), ("Llama", LLAMA_MODELS)):
            for (gpus, batch), model, cluster in list(zip(SIZES, models, clusters))[:num_sizes]:
                cases.append({"hardware": hw, "family": family, "model": model, "cluster": cluster,
                              "gpus": gpus, "global_batch_size": batch, "seq_length": seq})
    return sorted(cases, key=lambda c: (c["gpus"], c["hardware"], c["family"]))


# --- (a) tuning time at scale -------------------------------------------------------------------

def bench_large(reps: int) -> dict:
    warm_s, _ = timed(lambda: tune_training(**WARMUP, baselines=()), 1)
    model, cluster = load_model(LARGE["model"]), load_cluster(LARGE["cluster"])
    gbs, seq = LARGE["global_batch_size"], LARGE["seq_length"]
    times, result = timed(lambda: tune_training(model, cluster, gbs, seq, baselines=()), reps)
    meg_times, meg = timed(lambda: megatron_baseline(model, cluster, gbs, seq), reps)
    median, meg_median = statistics.median(times), statistics.median(meg_times)
    search = result.search.to_dict()
    return {
        **LARGE, "devices": cluster.num_devices, "warmup_s": warm_s[0],
        "tune_s_median": median, "tune_s_all": times,
        "layouts": search["layouts"], "evaluations": search["evaluated"],
        "evaluations_per_s": search["evaluated"] / median, "search": search,
        "megatron_search_s_median": meg_median, "megatron_search_s_all": meg_times,
        "ratio_tune_over_megatron": median / meg_median,
        "tuned_iteration_time_s": result.best.report.iteration_time_s,
        "tuned_analytic_time_s": result.best.analytic_time_s,
        "tuned_plan": plan_summary(result.best.plan),
        "megatron_iteration_time_s": meg.report.iteration_time_s if meg else None,
        "target_s": TARGET_S, "aim_s": AIM_S,
        "meets_target": median <= TARGET_S, "meets_aim": median <= AIM_S,
    }


# --- (b) the Mist grid --------------------------------------------------------------------------

def plan_summary(plan: TrainingPlan) -> dict:
    """The knobs of a plan, per stage where stages may differ."""
    stages = plan.stages or []
    offload = [{k: v for k, v in s.offload.model_dump().items() if v} if s.offload else {} for s in stages]
    out = {
        "tp": plan.tp, "pp": plan.pp, "dp": plan.dp, "mbs": plan.micro_batch_size, "v": plan.virtual_stages,
        "sequence_parallel": plan.sequence_parallel, "recompute": plan.recompute,
        "layers": [s.layers for s in stages], "zero": [s.zero_stage for s in stages],
        "checkpointed": [s.checkpointed_layers for s in stages], "offload": offload,
        "dp_shard": plan.dp_shard, "reshard_after_forward": plan.reshard_after_forward,
        "reshard_between_microbatches": plan.reshard_between_microbatches,
    }
    out["text"] = plan_text(out)
    return out


def plan_text(s: dict) -> str:
    """e.g. 'tp1 pp2 v4 dp4 mbs1 sel | L 14/18 Z 1/1 ck 0/3 | off s1: a0.5'."""
    head = f"tp{s['tp']} pp{s['pp']}" + (f" v{s['v']}" if s["v"] > 1 else "") + f" dp{s['dp']} mbs{s['mbs']}"
    head += (" sp" if s["sequence_parallel"] else "") + (" sel" if s["recompute"] == "selective" else "")
    head += (f" hsdp{s['dp_shard']}" if s.get("dp_shard") not in (None, s["dp"]) else "")
    head += ("" if s.get("reshard_after_forward", True) else " keep-fwd")
    head += ("" if s.get("reshard_between_microbatches", True) else " keep-mb")
    join = lambda xs: "/".join(str(x) for x in xs)  # noqa: E731
    parts = [head, f"L {join(s['layers'])} Z {join(s['zero'])} ck {join(s['checkpointed'])}"]
    off = [f"s{i}: " + ",".join(f"{k[0]}{v:g}" for k, v in o.items()) for i, o in enumerate(s["offload"]) if o]
    if off:
        parts.append("off " + "; ".join(off))
    return " | ".join(parts)


def run_case(case: dict) -> dict:
    t0 = time.perf_counter()
    try:
        result = tune_training(case["model"], case["cluster"], case["global_batch_size"], case["seq_length"],
                               baselines=BASELINES)
    except InfeasiblePlan as exc:
        return {**case, "error": str(exc), "tune_s": time.perf_counter() - t0}
    total_s = time.perf_counter() - t0
    best = result.best
    des_s = best.report.iteration_time_s
    row = {
        **case, "tune_s": result.search.seconds, "tune_with_baselines_s": total_s,
        "iteration_time_s": des_s, "analytic_time_s": best.analytic_time_s,
        "analytic_gap": best.analytic_time_s / des_s - 1, "mfu": best.report.mfu,
        "peak_memory_GiB": best.report.peak_memory_bytes / 2**30,
        "device_memory_GiB": best.report.device_memory_bytes / 2**30,
        "plan": plan_summary(best.plan), "search": result.search.to_dict(), "baselines": {},
        "family": result.winner,
        "families": {name: t and t.report.iteration_time_s for name, t in result.families.items()},
    }
    for name in BASELINES:
        base = result.baselines.get(name)
        row["baselines"][name] = None if base is None else {
            "iteration_time_s": base.report.iteration_time_s, "analytic_time_s": base.analytic_time_s,
            "speedup": base.report.iteration_time_s / des_s, "plan": plan_summary(base.plan),
        }
    return row


def mean_speedups(rows: list[dict]) -> dict:
    out = {}
    for name in BASELINES:
        s = [r["baselines"][name]["speedup"] for r in rows if "error" not in r and r["baselines"][name]]
        out[name] = {
            "cases_with_plan": len(s), "cases": len(rows),
            "geometric_mean": math.exp(statistics.fmean(math.log(x) for x in s)) if s else None,
            "arithmetic_mean": statistics.fmean(s) if s else None, "max": max(s) if s else None,
            "mist_published_average": MIST_PUBLISHED[name],
        }
    return out


def findings(rows: list[dict]) -> list[str]:
    """Things in the results that look wrong for the tuner: a baseline beating it, or its
    closed form far from the discrete-event simulation."""
    out = []
    for r in rows:
        tag = f"{r['model']} on {r['cluster']}"
        if "error" in r:
            out.append(f"{tag}: tuner found no plan ({r['error'][:80]}...)")
            continue
        if abs(r["analytic_gap"]) > GAP_FLAG:
            out.append(f"{tag}: analytic {r['analytic_time_s']:.3f} s vs DES {r['iteration_time_s']:.3f} s "
                       f"({r['analytic_gap']:+.1%})")
        for name, b in r["baselines"].items():
            if b and b["speedup"] < 1 - 1e-9:
                out.append(f"{tag}: {BASELINE_LABELS[name]} beats the tuner ({b['speedup']:.3f}x)")
    return out


# --- output -------------------------------------------------------------------------------------

def fmt_time(b: dict | None) -> str:
    return "-" if b is None else f"{b['iteration_time_s']:.2f}"


def fmt_speedup(b: dict | None) -> str:
    return "no fit" if b is None else f"{b['speedup']:.2f}x"


def print_large(a: dict) -> None:
    verdict = lambda ok: "met" if ok else "NOT met"  # noqa: E731
    print(f"(a) tuning {a['model']} on {a['devices']} GPUs ({a['cluster']}), batch {a['global_batch_size']}")
    print(f"    tune_training (median of {len(a['tune_s_all'])}): {a['tune_s_median']:.2f} s; "
          f"{a['layouts']:,} layouts, {a['evaluations']:,} evaluations, {a['evaluations_per_s']:,.0f} evaluations/s")
    print(f"    baseline: Megatron-LM search alone: {a['megatron_search_s_median']:.2f} s; "
          f"ratio tuner / Megatron-LM search = {a['ratio_tune_over_megatron']:.2f}x")
    print(f"    target <= {a['target_s']:.0f} s: {verdict(a['meets_target'])}; aim <= {a['aim_s']:.0f} s: "
          f"{verdict(a['meets_aim'])}  (warm-up incl. cost-model compile: {a['warmup_s']:.2f} s)")
    meg = a["megatron_iteration_time_s"]
    meg_text = "no fitting plan" if meg is None else f"{meg:.2f} s"
    print(f"    tuned plan {a['tuned_plan']['text']}: {a['tuned_iteration_time_s']:.2f} s/iteration "
          f"(Megatron-LM best: {meg_text})")


def print_grid(rows: list[dict], means: dict) -> None:
    head = ("hw", "model", "GPUs", "tuned s", "analytic", "Megatron s", "speedup", "Aceso s", "speedup", "tune s", "plan")
    table = []
    for r in rows:
        if "error" in r:
            table.append((r["hardware"], r["model"], str(r["gpus"]), "no plan", "", "", "", "", "", f"{r['tune_s']:.1f}", ""))
            continue
        b = r["baselines"]
        table.append((r["hardware"], r["model"], str(r["gpus"]), f"{r['iteration_time_s']:.2f}",
                      f"{r['analytic_gap']:+.1%}", fmt_time(b["megatron"]), fmt_speedup(b["megatron"]),
                      fmt_time(b["aceso"]), fmt_speedup(b["aceso"]), f"{r['tune_s']:.1f}", r["plan"]["text"]))
    widths = [max(len(x) for x in col) for col in zip(head, *table)]
    for line in (head, *table):
        print("  ".join(x.ljust(w) if i in (0, 1, 10) else x.rjust(w) for i, (x, w) in enumerate(zip(line, widths))))
    print()
    for name, m in means.items():
        if m["geometric_mean"] is None:
            print(f"over {BASELINE_LABELS[name]}: no case where the baseline found a plan")
            continue
        print(f"over {BASELINE_LABELS[name]}: geometric mean {m['geometric_mean']:.3f}x, arithmetic mean "
              f"{m['arithmetic_mean']:.3f}x, max {m['max']:.2f}x ({m['cases_with_plan']} of {m['cases']} cases "
              f"where the baseline found a fitting plan)   [Mist's published average on real hardware, "
              f"not ours: {m['mist_published_average']:.2f}x]")


def markdown(result: dict) -> str:
    """The grid as a markdown table, for the README."""
    rows, means = result["grid"]["rows"], result["grid"]["mean_speedups"]
    lines = [
        "<!-- generated by benchmarks/bench_training_tuner.py from training_tuner.json; do not edit -->",
        "",
        f"Simulated iteration time (s) of the tuned plan and of the best plan each baseline finds, "
        f"on the simulator (run {result['timestamp']}{', --quick' if result['quick'] else ''}). "
        "Speedup = baseline / tuned; 'no fit' = nothing in the baseline's space fits in memory.",
        "",
        "| hardware | model | GPUs | batch | tuned (s) | analytic vs DES | Megatron-LM (s) | speedup "
        "| Aceso-style (s) | speedup | tuning (s) | family | tuned plan |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['hardware']} | {r['model']} | {r['gpus']} | {r['global_batch_size']} "
                         f"| no plan | | | | | | {r['tune_s']:.1f} | | |")
            continue
        b = r["baselines"]
        lines.append(
            f"| {r['hardware']} | {r['model']} | {r['gpus']} | {r['global_batch_size']} | {r['iteration_time_s']:.2f} "
            f"| {r['analytic_gap']:+.1%} | {fmt_time(b['megatron'])} | {fmt_speedup(b['megatron'])} "
            f"| {fmt_time(b['aceso'])} | {fmt_speedup(b['aceso'])} | {r['tune_s']:.1f} "
            f"| {md_escape(r.get('family', ''))} | `{md_escape(r['plan']['text'])}` |")
    lines.append("")
    for name, m in means.items():
        if m["geometric_mean"] is None:
            continue
        lines.append(f"- Over {BASELINE_LABELS[name]}: geometric mean {m['geometric_mean']:.2f}x, arithmetic "
                     f"mean {m['arithmetic_mean']:.2f}x ({m['cases_with_plan']} of {m['cases']} cases with a "
                     f"fitting baseline plan). For reference, Mist's published average on real hardware is "
                     f"{m['mist_published_average']:.2f}x (Zhu et al., EuroSys'25) - their measurement, not ours.")
    wins = collections.Counter(r.get("family") for r in rows if "error" not in r)
    lines.append("- Winning family (FSDP, HSDP, FSDP+TP, 3D; see the README): "
                 + ", ".join(f"{name} {n}" for name, n in wins.most_common()) + ".")
    a = result.get("large")
    if a:
        lines.append(f"- Tuning {a['model']} on {a['devices']} GPUs: {a['tune_s_median']:.1f} s "
                     f"({a['evaluations']:,} evaluations, {a['evaluations_per_s']:,.0f}/s); the Megatron-LM "
                     f"baseline search alone: {a['megatron_search_s_median']:.1f} s.")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    args = common.parser(__doc__.splitlines()[0], "1 repetition, first 2 grid sizes (smoke run)",
                         DEFAULT_OUT).parse_args(argv)
    if args.markdown_only:
        return common.rewrite_markdown(args.out, markdown)

    reps = {k: v[1] if args.quick else v[0] for k, v in REPS.items()}
    large = bench_large(reps["large"])
    print_large(large)
    print()
    rows = []
    cases = grid_cases(2 if args.quick else len(SIZES))
    for n, case in enumerate(cases):
        print(f"  [{n + 1}/{len(cases)}] {case['model']} on {case['cluster']}", file=sys.stderr, flush=True)
        rows.append(run_case(case))
    means = mean_speedups(rows)
    print("(b) Mist grid (simulated; speedup = baseline / tuned iteration time)")
    print_grid(rows, means)
    flags = findings(rows)
    common.print_findings(flags)
    result = {
        **common.run_fields("training_tuner", args.quick, reps),
        "large": large,
        "grid": {"sizes": SIZES, "hardware": {k: {"clusters": v[0], "seq_length": v[1]} for k, v in HARDWARE.items()},
                 "rows": rows, "mean_speedups": means, "findings": flags,
                 "mist_published_note": "Mist (Zhu et al., EuroSys'25) average speedups measured on real "
                                        "hardware; a reference, not a result of this benchmark"},
    }
    common.write_results(result, args.out, markdown)
    return result


if __name__ == "__main__":
    main()
