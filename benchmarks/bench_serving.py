"""Benchmark the serving simulator and tuner: how fast it simulates, and what re-sharding buys.

(a) Simulator speed: simulated requests per wall-clock second of `simulate_serving` for
    10,000 offline ShareGPT-like requests on Llama-2-70B served by one TP4 vLLM-style replica
    ('vllm-tp4' on '4xa100-80gb'), median of 3 runs. Baseline measured in the same run: the
    same with 1,000 requests (the ratio shows whether cost per request grows with the run).
(b) The Seesaw grid (Su et al., MLSys'25, Sec. 6): Llama-3 15B-class, CodeLlama-34B and
    Llama-2-70B on A10G, L4 and A100 nodes, each with ShareGPT-like (2,000 requests) and
    arXiv-summarization-like (500 requests) offline workloads. Every case is tuned by
    `tune_serving`: the best static deployment (layout and scheduler: the best vLLM-style
    configuration, our baseline) and the best re-sharding one; the ratio is their simulated
    output tokens/s. Seesaw's published speedups on real hardware (1.06x-1.78x, 1.36x on
    average over vLLM) are printed beside ours for reference only: they are measurements of
    a different system, not ours.

Usage: python benchmarks/bench_serving.py [--quick] [--screen-requests N] [--out PATH] [--markdown-only]
Writes JSON (default benchmarks/results/serving.json) atomically, and the grid as a markdown
table (benchmarks/results/serving.md) generated from that JSON.
"""

from __future__ import annotations

import math
import statistics
import sys
import time

import common
from common import md_escape, timed

from simulator.errors import InfeasiblePlan, SpecError
from simulator.serving.simulate import simulate_serving
from simulator.specs.serving import DeploymentSpec
from tuner.serving import ServingTuneResult, tune_serving

DEFAULT_OUT = common.RESULTS / "serving.json"

SPEED = {"model": "llama-2-70b", "cluster": "4xa100-80gb", "deployment": "vllm-tp4", "preset": "sharegpt-like"}
SPEED_REQUESTS = {"large": 10_000, "baseline": 1_000}

CASES = (  # (model, cluster), in Seesaw's order
    ("llama-3-15b-class", "4xa10g"), ("llama-3-15b-class", "4xl4"),
    ("codellama-34b", "8xa10g"), ("codellama-34b", "8xl4"),
    ("llama-2-70b", "8xa10g"), ("llama-2-70b", "8xl4"),
    ("llama-2-70b", "8xa100-80gb"), ("llama-2-70b", "8xa100-80gb-pcie"),
)
WORKLOADS = ("sharegpt-like", "arxiv-summarization-like")
SEESAW_PUBLISHED = {"min": 1.06, "max": 1.78, "average": 1.36}  # Su et al. MLSys'25, abstract: over vLLM
SCREEN_REQUESTS = 300  # tune_serving's default; the full grid takes ~5 min on 2 cores with it

# Repetitions: full run, and --quick.
REPS = {"large": (3, 1), "baseline": (5, 2)}


# --- (a) simulator speed ------------------------------------------------------------------------

def bench_speed(reps: dict[str, int]) -> dict:
    out = {**SPEED}
    for key, n in SPEED_REQUESTS.items():
        workload = {"num_requests": n, "preset": SPEED["preset"]}
        times, report = timed(lambda w=workload: simulate_serving(SPEED["model"], SPEED["cluster"],
                                                                   SPEED["deployment"], w), reps[key])
        median = statistics.median(times)
        out[key] = {"requests": n, "seconds_median": median, "seconds_all": times,
                    "requests_per_s": n / median, "steps": sum(report.steps.values()),
                    "steps_per_s": sum(report.steps.values()) / median,
                    "simulated_makespan_s": report.makespan_s,
                    "simulated_output_tokens_per_s": report.output_tokens_per_s,
                    "preemptions": report.preemptions}
    out["ratio_large_over_baseline"] = out["large"]["requests_per_s"] / out["baseline"]["requests_per_s"]
    return out


# --- (b) the Seesaw grid ------------------------------------------------------------------------

def deployment_summary(dep: DeploymentSpec) -> dict:
    layout = dep.prefill.describe() if not dep.resharding else f"{dep.prefill.describe()} -> {dep.decode.describe()}"
    return {"dp": dep.dp, "prefill": {"tp": dep.prefill.tp, "pp": dep.prefill.pp},
            "decode": {"tp": dep.decode.tp, "pp": dep.decode.pp}, "scheduler": dep.scheduler,
            "cpu_kv_buffer_GB": dep.cpu_kv_buffer_GB, "text": f"dp{dep.dp} {layout} {dep.scheduler}"}


def evaluated_summary(e) -> dict | None:
    if e is None:
        return None
    r = e.report
    return {"deployment": deployment_summary(e.deployment), "output_tokens_per_s": r.output_tokens_per_s,
            "total_tokens_per_s": r.total_tokens_per_s, "makespan_s": r.makespan_s,
            "transitions": r.transitions, "transition_time_s": r.transition_time_s,
            "preemptions": r.preemptions, "kv_utilization_mean": r.kv_utilization["mean"],
            "ttft_p50_s": r.ttft_s["p50"], "tpot_p50_s": r.tpot_s["p50"]}


def run_case(model: str, cluster: str, workload: str, screen_requests: int) -> dict:
    case = {"model": model, "cluster": cluster, "workload": workload}
    t0 = time.perf_counter()
    try:
        result: ServingTuneResult = tune_serving(model, cluster, workload, screen_requests=screen_requests)
    except (InfeasiblePlan, SpecError) as exc:
        return {**case, "error": str(exc), "tune_s": time.perf_counter() - t0}
    reasons: dict[str, int] = {}
    for p in result.pruned:
        key = p["reason"].split(":")[0][:60]
        reasons[key] = reasons.get(key, 0) + 1
    return {
        **case, "tune_s": result.search["seconds"], "search": result.search,
        "static": evaluated_summary(result.static), "resharding": evaluated_summary(result.resharding),
        "ratio": result.ratio, "pruned": len(result.pruned), "pruned_reasons": reasons,
        "pruned_examples": result.pruned[:3],
    }


def mean_ratios(rows: list[dict]) -> dict:
    r = [x["ratio"] for x in rows if x.get("ratio") is not None]
    by_workload = {}
    for w in WORKLOADS:
        rw = [x["ratio"] for x in rows if x.get("ratio") is not None and x["workload"] == w]
        if rw:
            by_workload[w] = {"geometric_mean": math.exp(statistics.fmean(math.log(x) for x in rw)),
                              "arithmetic_mean": statistics.fmean(rw), "cases": len(rw)}
    return {
        "cases_with_ratio": len(r), "cases": len(rows),
        "geometric_mean": math.exp(statistics.fmean(math.log(x) for x in r)) if r else None,
        "arithmetic_mean": statistics.fmean(r) if r else None,
        "min": min(r) if r else None, "max": max(r) if r else None,
        "by_workload": by_workload, "seesaw_published": SEESAW_PUBLISHED,
    }


def findings(rows: list[dict]) -> list[str]:
    """Things in the results worth a look: no fitting deployment, re-sharding losing, a
    re-sharding winner that never re-sharded, or one whose transitions dominate."""
    out = []
    for r in rows:
        tag = f"{r['model']} on {r['cluster']}, {r['workload']}"
        if "error" in r:
            out.append(f"{tag}: nothing fits ({r['error'][:100]}...)")
            continue
        if r["static"] is None or r["resharding"] is None:
            out.append(f"{tag}: no {'static' if r['static'] is None else 're-sharding'} deployment fits")
            continue
        rs = r["resharding"]
        if r["ratio"] < 1 - 1e-9:
            out.append(f"{tag}: the best re-sharding deployment is slower than the best static one ({r['ratio']:.3f}x)")
        if rs["transitions"] == 0:
            out.append(f"{tag}: the re-sharding winner never re-sharded")
        elif rs["transition_time_s"] > 0.2 * rs["makespan_s"]:
            out.append(f"{tag}: transitions take {rs['transition_time_s'] / rs['makespan_s']:.0%} of the run")
    return out


# --- output -------------------------------------------------------------------------------------

def print_speed(a: dict) -> None:
    big, base = a["large"], a["baseline"]
    print(f"(a) simulate_serving: {a['model']} on {a['cluster']} ({a['deployment']}), {a['preset']} offline")
    print(f"    {big['requests']:,} requests: {big['seconds_median']:.2f} s (median of {len(big['seconds_all'])}) "
          f"= {big['requests_per_s']:,.0f} requests/s, {big['steps_per_s']:,.0f} steps/s")
    print(f"    baseline {base['requests']:,} requests: {base['seconds_median']:.3f} s "
          f"(median of {len(base['seconds_all'])}) = {base['requests_per_s']:,.0f} requests/s")
    print(f"    ratio {big['requests']:,} / {base['requests']:,}-request rate = {a['ratio_large_over_baseline']:.2f}x")


def fmt_tps(e: dict | None) -> str:
    return "-" if e is None else f"{e['output_tokens_per_s']:,.0f}"


def grid_table(rows: list[dict]) -> tuple[tuple[str, ...], list[tuple[str, ...]]]:
    head = ("model", "cluster", "workload", "static (best)", "tok/s", "re-sharding (best)", "tok/s",
            "ratio", "trans.", "tune s", "pruned")
    table = []
    for r in rows:
        if "error" in r:
            table.append((r["model"], r["cluster"], r["workload"], "nothing fits", "", "", "", "", "",
                          f"{r['tune_s']:.1f}", ""))
            continue
        s, rs = r["static"], r["resharding"]
        table.append((r["model"], r["cluster"], r["workload"], s["deployment"]["text"] if s else "no fit",
                      fmt_tps(s), rs["deployment"]["text"] if rs else "no fit", fmt_tps(rs),
                      "-" if r["ratio"] is None else f"{r['ratio']:.2f}x",
                      "-" if rs is None else str(rs["transitions"]), f"{r['tune_s']:.1f}", str(r["pruned"])))
    return head, table


def mean_lines(m: dict, published: bool = True) -> list[str]:
    if m["geometric_mean"] is None:
        return ["no case with both a static and a re-sharding deployment"]
    pub = m["seesaw_published"]
    lines = [f"re-sharding / static over {m['cases_with_ratio']} of {m['cases']} cases: geometric mean "
             f"{m['geometric_mean']:.3f}x, arithmetic mean {m['arithmetic_mean']:.3f}x "
             f"(range {m['min']:.2f}x-{m['max']:.2f}x)"
             + (f"   [Seesaw's published speedup over vLLM on real hardware, their measurement, not ours: "
                f"{pub['min']:.2f}x-{pub['max']:.2f}x, {pub['average']:.2f}x average]" if published else "")]
    for w, b in m["by_workload"].items():
        lines.append(f"  {w}: geometric mean {b['geometric_mean']:.3f}x, arithmetic mean "
                     f"{b['arithmetic_mean']:.3f}x ({b['cases']} cases)")
    return lines


def print_grid(rows: list[dict], means: dict) -> None:
    head, table = grid_table(rows)
    widths = [max(len(x) for x in col) for col in zip(head, *table)]
    left = {0, 1, 2, 3, 5}
    for line in (head, *table):
        print("  ".join(x.ljust(w) if i in left else x.rjust(w) for i, (x, w) in enumerate(zip(line, widths))))
    print()
    for line in mean_lines(means):
        print(line)


def markdown(result: dict) -> str:
    """The grid as a markdown table, for the README."""
    rows, means, a = result["grid"]["rows"], result["grid"]["mean_ratios"], result["speed"]
    head, table = grid_table(rows)
    lines = [
        "<!-- generated by benchmarks/bench_serving.py from serving.json; do not edit -->",
        "",
        f"Simulated output tokens/s of the best static deployment (vLLM- or Sarathi-style scheduler) and "
        f"the best re-sharding (Seesaw-style) deployment found by `tune_serving` "
        f"(run {result['timestamp']}{', --quick' if result['quick'] else ''}; each case screened on at least "
        f"{result['grid']['screen_requests']} requests, and on enough to fill the largest candidate's batch slots; "
        "finalists re-simulated on the whole workload). "
        "Ratio = re-sharding / static; trans. = re-sharding transitions in the run; pruned = candidates "
        "that do not fit.",
        "",
        "| " + " | ".join(head) + " |",
        "|---|---|---|---|--:|---|--:|--:|--:|--:|--:|",
    ]
    for line in table:
        cells = [f"`{md_escape(x)}`" if i in (3, 5) and x and x not in ("no fit", "nothing fits") else x
                 for i, x in enumerate(line)]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines += [f"- {line.strip()}" for line in mean_lines(means, published=False)]
    lines.append("- Seesaw (Su et al., MLSys'25) reports 1.06x-1.78x (1.36x average) over vLLM measured on "
                 "real GPUs: their measurement, not ours; ours are simulator predictions.")
    lines.append(f"- Simulator speed: {a['large']['requests']:,} {a['preset']} requests on {a['model']} "
                 f"({a['deployment']}, {a['cluster']}) in {a['large']['seconds_median']:.1f} s = "
                 f"{a['large']['requests_per_s']:,.0f} requests/s; {a['baseline']['requests']:,} requests: "
                 f"{a['baseline']['requests_per_s']:,.0f} requests/s "
                 f"(ratio {a['ratio_large_over_baseline']:.2f}x).")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = common.parser(__doc__.splitlines()[0], "fewer repetitions; first 2 cases, sharegpt only",
                           DEFAULT_OUT)
    parser.add_argument("--screen-requests", type=int, default=SCREEN_REQUESTS,
                        help="requests per screening simulation in tune_serving")
    args = parser.parse_args(argv)
    if args.markdown_only:
        return common.rewrite_markdown(args.out, markdown)

    reps = {k: v[1] if args.quick else v[0] for k, v in REPS.items()}
    speed = bench_speed(reps)
    print_speed(speed)
    print()
    cases = [(m, c, w) for m, c in CASES for w in WORKLOADS]
    if args.quick:
        cases = [(m, c, "sharegpt-like") for m, c in CASES[:2]]
    rows = []
    for n, (model, cluster, workload) in enumerate(cases):
        print(f"  [{n + 1}/{len(cases)}] {model} on {cluster}, {workload}", file=sys.stderr, flush=True)
        rows.append(run_case(model, cluster, workload, args.screen_requests))
    means = mean_ratios(rows)
    print(f"(b) Seesaw grid (simulated output tokens/s; ratio = re-sharding / static; "
          f"screened on at least {args.screen_requests} requests)")
    print_grid(rows, means)
    flags = findings(rows)
    common.print_findings(flags)
    result = {
        **common.run_fields("serving", args.quick, reps),
        "speed": speed,
        "grid": {"cases": CASES, "workloads": WORKLOADS if not args.quick else ["sharegpt-like"],
                 "screen_requests": args.screen_requests, "rows": rows, "mean_ratios": means,
                 "findings": flags,
                 "seesaw_published_note": "Seesaw (Su et al., MLSys'25) speedups over vLLM measured on real "
                                          "hardware; a reference, not a result of this benchmark"},
    }
    common.write_results(result, args.out, markdown)
    return result


if __name__ == "__main__":
    main()
