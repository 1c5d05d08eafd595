"""Benchmark the serving simulator and tuner: how fast it simulates, and what re-sharding buys.

(a) Simulator speed, fast-forward against step by step (`exact_steps=True`) in the same run:
    simulated requests per wall-clock second of `simulate_serving` for 10,000 and 100,000
    offline requests of three workloads: ShareGPT-like on Llama-2-70B ('vllm-tp4' on
    '4xa100-80gb'), arXiv-summarization-like (long prompts) on the same replica, and
    ShareGPT-like on Llama-3-70B with speculative decoding ('vllm-tp4-spec-llama3'). At 10,000
    requests both modes are repeated, interleaved (median and spread) and checked to give the
    same report; at 100,000 fast-forward runs once, and step by step only for ShareGPT (one run
    of about two minutes; the other two are left out to bound the benchmark's time). Then the
    serving tuner's wall time on the first cases of the Seesaw grid (`--tuner-cases N` of its 8
    (model, cluster) pairs, each with both workloads; 8 = the whole grid), step by step and
    with fast-forward, interleaved case by case. The machine's load average is recorded
    before and after each part (the machine is shared).
(b) The Seesaw grid (Su et al., MLSys'25, Sec. 6): Llama-3 15B-class, CodeLlama-34B and
    Llama-2-70B on A10G, L4 and A100 nodes, each with ShareGPT-like (2,000 requests) and
    arXiv-summarization-like (500 requests) offline workloads. Every case is tuned by
    `tune_serving`: the best static deployment (layout and scheduler: the best vLLM-style
    configuration, our baseline) and the best re-sharding one; the ratio is their simulated
    output tokens/s. Seesaw's published speedups on real hardware (1.06x-1.78x, 1.36x on
    average over vLLM) are printed beside ours for reference only: they are measurements of
    a different system, not ours.

Usage: python benchmarks/bench_serving.py [--quick] [--speed-only] [--tuner-cases N] [--screen-requests N]
       [--out PATH] [--markdown-only]
Writes JSON (default benchmarks/results/serving.json) atomically, and the grid as a markdown
table (benchmarks/results/serving.md) generated from that JSON; `--speed-only` runs (a) alone
into benchmarks/results/serving_speed.json and .md.
"""

from __future__ import annotations

import math
import os
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

SPEED_CASES = {  # name -> (model, cluster, deployment, preset)
    "sharegpt": ("llama-2-70b", "4xa100-80gb", "vllm-tp4", "sharegpt-like"),
    "arxiv": ("llama-2-70b", "4xa100-80gb", {"prefill": {"tp": 4, "pp": 1}, "scheduler": "vllm",
                                             "max_batched_tokens": 16384}, "arxiv-summarization-like"),
    "speculative": ("llama-3-70b", "4xa100-80gb", "vllm-tp4-spec-llama3", "sharegpt-like"),
}
SPEED_REQUESTS = (10_000, 100_000)
EXACT_AT_100K = ("sharegpt",)  # step by step at 100,000 requests: ~2 min each, so one case only
TUNER_CASES = 1  # (model, cluster) pairs of the grid timed both ways, each with both workloads (time)
DEFAULT_SPEED_OUT = common.RESULTS / "serving_speed.json"

CASES = (  # (model, cluster), in Seesaw's order
    ("llama-3-15b-class", "4xa10g"), ("llama-3-15b-class", "4xl4"),
    ("codellama-34b", "8xa10g"), ("codellama-34b", "8xl4"),
    ("llama-2-70b", "8xa10g"), ("llama-2-70b", "8xl4"),
    ("llama-2-70b", "8xa100-80gb"), ("llama-2-70b", "8xa100-80gb-pcie"),
)
WORKLOADS = ("sharegpt-like", "arxiv-summarization-like")
SEESAW_PUBLISHED = {"min": 1.06, "max": 1.78, "average": 1.36}  # Su et al. MLSys'25, abstract: over vLLM
SCREEN_REQUESTS = 300  # tune_serving's default; the full grid takes ~5 min on 2 cores with it

# Repetitions at 10,000 requests (fast-forward, step by step), full run and --quick.
REPS = {"fast": (5, 1), "exact": (2, 1)}


# --- (a) simulator speed ------------------------------------------------------------------------

def _simulate(case: str, n: int, exact: bool):
    model, cluster, deployment, preset = SPEED_CASES[case]
    return simulate_serving(model, cluster, deployment, {"num_requests": n, "preset": preset}, exact_steps=exact)


def _timing(times: list[float], n: int) -> dict:
    median = statistics.median(times)
    return {"seconds_median": median, "seconds_all": times, "requests_per_s": n / median,
            "spread": (max(times) - min(times)) / median}


def bench_case(case: str, reps: dict[str, int]) -> dict:
    """Both modes at 10,000 requests (interleaved), fast-forward (and maybe step by step) at 100,000."""
    out: dict = {"model": SPEED_CASES[case][0], "cluster": SPEED_CASES[case][1],
                 "deployment": SPEED_CASES[case][2], "preset": SPEED_CASES[case][3]}
    small, big = SPEED_REQUESTS
    times: dict[bool, list[float]] = {False: [], True: []}
    reports = {}
    for rep in range(max(reps.values())):
        for exact in (False, True):
            if rep < reps["exact" if exact else "fast"]:
                t, reports[exact] = timed(lambda e=exact: _simulate(case, small, e), 1)
                times[exact] += t
    fast, exact = reports[False], reports[True]
    out[str(small)] = {"fast_forward": _timing(times[False], small), "exact_steps": _timing(times[True], small),
                       "steps": sum(fast.steps.values()), "same_report": fast.to_dict() == exact.to_dict(),
                       "simulated_makespan_s": fast.makespan_s, "preemptions": fast.preemptions}
    out[str(small)]["ratio"] = times_ratio(out[str(small)])
    t, report = timed(lambda: _simulate(case, big, False), 1)
    row = {"fast_forward": _timing(t, big), "steps": sum(report.steps.values())}
    if case in EXACT_AT_100K:
        t, exact = timed(lambda: _simulate(case, big, True), 1)
        row["exact_steps"] = _timing(t, big)
        row["same_report"] = exact.to_dict() == report.to_dict()
        row["ratio"] = times_ratio(row)
    else:
        row["exact_steps"] = None
        row["note"] = "step by step not run at 100,000 requests (time); see the 10,000-request ratio"
    out[str(big)] = row
    out["cost_per_request_100k_over_10k"] = (row["fast_forward"]["seconds_median"] / big) / \
        (out[str(small)]["fast_forward"]["seconds_median"] / small)
    return out


def times_ratio(row: dict) -> float:
    return row["fast_forward"]["requests_per_s"] / row["exact_steps"]["requests_per_s"]


def bench_tuner(cases: list[tuple[str, str, str]], screen_requests: int) -> dict:
    """The tuner's wall time on these grid cases, step by step then fast-forward, case by case."""
    rows = []
    for model, cluster, workload in cases:
        row = {"model": model, "cluster": cluster, "workload": workload}
        for key, exact in (("exact_steps_s", True), ("fast_forward_s", False)):
            t0 = time.perf_counter()
            try:
                tune_serving(model, cluster, workload, screen_requests=screen_requests, exact_steps=exact)
            except (InfeasiblePlan, SpecError) as exc:  # timed all the same, and said
                row[key[:-2] + "_error"] = str(exc)[:300]
            row[key] = time.perf_counter() - t0
        rows.append(row)
    before, after = sum(r["exact_steps_s"] for r in rows), sum(r["fast_forward_s"] for r in rows)
    return {"cases": rows, "exact_steps_s": before, "fast_forward_s": after, "ratio": before / after,
            "screen_requests": screen_requests}


def load_average() -> list[float]:
    """1, 5 and 15-minute load averages (2 cores: above 2, other work competes for them)."""
    return [round(x, 2) for x in os.getloadavg()]


def bench_speed(reps: dict[str, int], screen_requests: int, quick: bool, tuner_cases: int = TUNER_CASES) -> dict:
    for exact in (False, True):  # warm up: the cost model's first compilation is not the simulator's
        _simulate("sharegpt", 100, exact)
    out = {}
    for case in (("sharegpt",) if quick else SPEED_CASES):
        before = load_average()
        out[case] = {**bench_case(case, reps), "load_average_before": before, "load_average_after": load_average()}
    cases = [(m, c, w) for m, c in CASES[:1 if quick else tuner_cases] for w in WORKLOADS]
    before = load_average()
    tuner = bench_tuner(cases, screen_requests)
    return {"cases": out, "tuner": {**tuner, "load_average_before": before, "load_average_after": load_average()}}


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

def speed_lines(a: dict) -> list[str]:
    small, big = (str(n) for n in SPEED_REQUESTS)
    lines = []
    for case, r in a["cases"].items():
        lo, hi = r[small], r[big]
        lines.append(f"{case} ({r['preset']}, {r['model']} on {r['cluster']}):")
        for n, row in ((small, lo), (big, hi)):
            ff, ex = row["fast_forward"], row["exact_steps"]
            line = (f"  {int(n):,} requests: fast-forward {ff['requests_per_s']:,.0f} requests/s "
                    f"({ff['seconds_median']:.2f} s, median of {len(ff['seconds_all'])}, spread {ff['spread']:.0%})")
            if ex:
                line += (f"; step by step {ex['requests_per_s']:,.0f} requests/s ({ex['seconds_median']:.2f} s, "
                         f"median of {len(ex['seconds_all'])}); ratio {row['ratio']:.1f}x; "
                         f"same report: {row['same_report']}")
            else:
                line += f"; {row['note']}"
            lines.append(line)
        lines.append(f"  cost per request at 100,000 / at 10,000 (fast-forward): {r['cost_per_request_100k_over_10k']:.2f}x")
        if "load_average_before" in r:
            lines.append(f"  load average (1, 5, 15 min) before / after: {_load(r['load_average_before'])} / "
                         f"{_load(r['load_average_after'])}")
    t = a["tuner"]
    lines.append(f"tune_serving on {len(t['cases'])} Seesaw-grid cases (screened on {t['screen_requests']} requests): "
                 f"step by step {t['exact_steps_s']:.1f} s, fast-forward {t['fast_forward_s']:.1f} s, "
                 f"ratio {t['ratio']:.2f}x"
                 + (f"; load average before / after: {_load(t['load_average_before'])} / {_load(t['load_average_after'])}"
                    if "load_average_before" in t else ""))
    for c in t["cases"]:
        errors = [c[k] for k in ("exact_steps_error", "fast_forward_error") if k in c]
        lines.append(f"  {c['model']} on {c['cluster']}, {c['workload']}: {c['exact_steps_s']:.1f} s -> {c['fast_forward_s']:.1f} s"
                     + (f" (the tuner refused: {errors[0][:120]})" if errors else ""))
    return lines


def _load(avg: list[float]) -> str:
    return ", ".join(f"{x:.1f}" for x in avg)


def speed_markdown(result: dict) -> str:
    lines = ["<!-- generated by benchmarks/bench_serving.py --speed-only from serving_speed.json; do not edit -->", "",
             f"Serving simulator speed, fast-forward vs step by step (`exact_steps=True`), measured in the same run "
             f"({result['timestamp']}{', --quick' if result['quick'] else ''}, {result['machine']['cpu_count']} CPUs):", ""]
    lines += [f"- {x.strip()}" if not x.startswith("  ") else f"  - {x.strip()}" for x in speed_lines(result["speed"])]
    return "\n".join(lines) + "\n"


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
    rows, means = result["grid"]["rows"], result["grid"]["mean_ratios"]
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
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = common.parser(__doc__.splitlines()[0], "fewer repetitions; first 2 cases, sharegpt only",
                           DEFAULT_OUT)
    parser.add_argument("--screen-requests", type=int, default=SCREEN_REQUESTS,
                        help="requests per screening simulation in tune_serving")
    parser.add_argument("--speed-only", action="store_true",
                        help="only (a), into benchmarks/results/serving_speed.json (unless --out)")
    parser.add_argument("--tuner-cases", type=int, default=TUNER_CASES, choices=range(1, len(CASES) + 1),
                        metavar=f"1..{len(CASES)}",
                        help=f"(model, cluster) pairs of the Seesaw grid whose tuning (a) times both ways, "
                             f"each with both workloads; {len(CASES)} = the whole grid")
    args = parser.parse_args(argv)
    if args.speed_only and args.out == DEFAULT_OUT:
        args.out = DEFAULT_SPEED_OUT
    if args.markdown_only:
        return common.rewrite_markdown(args.out, speed_markdown if args.speed_only else markdown)

    reps = {k: v[1] if args.quick else v[0] for k, v in REPS.items()}
    if args.speed_only:
        speed = bench_speed(reps, args.screen_requests, args.quick, args.tuner_cases)
        print("\n".join(speed_lines(speed)))
        result = {**common.run_fields("serving_speed", args.quick, reps), "speed": speed}
        common.write_results(result, args.out, speed_markdown)
        return result
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
