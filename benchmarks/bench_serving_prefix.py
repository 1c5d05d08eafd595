"""Prefix caching, measured and simulated: the real engine with and without it on prompts that open
alike, against `simulate_serving` on the same requests.

What runs (`python benchmarks/bench_serving_prefix.py`, ~4 min; `--quick` ~1 min): a Poisson
load whose prompts open with one of a few shared prefixes (a system prompt: `shared_prefix` of
the workload spec, the same draws on both sides), served by SmolLM2-135M (bf16, one rank, one
thread) with `prefix_caching` off and on, interleaved and repeated; and the simulator's
prediction of both from the committed profile of this CPU (`bench_serving_vs_sim`'s
machinery: the same engine spec, request timing and report formulas). Printed and written:
output tokens/s, TTFT and TPOT p50/p90 measured (median of the repeats) beside predicted, the
prompt tokens each side took from the cache, and the speedup of caching (on / off) measured
beside predicted, as ratios of runs in the same session.

Usage: python benchmarks/bench_serving_prefix.py [--quick] [--repeats N] [--out PATH] [--markdown-only]
Writes benchmarks/results/serving_prefix.json and .md atomically.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_serving_vs_sim as vs  # noqa: E402
import common  # noqa: E402
import torch  # noqa: E402

from executor.allocator import keep_freed_memory  # noqa: E402
from executor.serving.model import load_decoder  # noqa: E402
from simulator.serving.simulate import simulate_serving  # noqa: E402
from simulator.serving.workload import describe_lengths, generate_requests  # noqa: E402
from simulator.specs.catalog import load_cluster  # noqa: E402
from simulator.specs.serving import WorkloadSpec  # noqa: E402

DEFAULT_OUT = common.RESULTS / "serving_prefix.json"
# a chat service with two system prompts of 512 tokens, short user turns and answers
WORKLOAD = {"name": "poisson-shared-prefix", "num_requests": 24, "arrival": {"kind": "poisson", "rate_per_s": 1.0},
            "input_tokens": {"distribution": "uniform", "min": 32, "max": 96},
            "output_tokens": {"distribution": "uniform", "min": 16, "max": 32},
            "shared_prefix": {"tokens": 512, "groups": 2}, "seed": 2}
QUICK_REQUESTS = 8
CONFIGS = [vs.Config("TP1", "prefix", {"prefill": {"tp": 1, "pp": 1}}),
           vs.Config("TP1 cached", "prefix", {"prefill": {"tp": 1, "pp": 1}, "prefix_caching": True})]


def prompts_for(requests, seed: int) -> list[list[int]]:
    """Each request's token ids: its group's prefix (the same ids for every request of the group),
    then seeded random ids of its own."""
    g = torch.Generator().manual_seed(seed)
    groups = sorted({r.prefix_group for r in requests})
    tokens = requests[0].prefix_tokens
    prefixes = {grp: torch.randint(*vs.TOKEN_RANGE, (tokens,), generator=g).tolist() for grp in groups}
    return [prefixes[r.prefix_group] + torch.randint(*vs.TOKEN_RANGE, (r.input_tokens - tokens,), generator=g).tolist()
            for r in requests]


def simulate(cfg: vs.Config, workload: dict[str, Any], profile: Path) -> dict[str, Any]:
    rep = simulate_serving(vs.MODEL, load_cluster("1xcpu", profile=profile), vs.simulated_spec(cfg, profile), workload)
    return {**vs.metrics_of(rep.output_tokens_per_s, rep.ttft_s, rep.tpot_s),
            "cached_prompt_tokens": (rep.prefix_cache or {}).get("cached_prompt_tokens", 0)}


def run(quick: bool, repeats: int) -> dict[str, Any]:
    torch.set_num_threads(vs.THREADS_PER_RANK)
    profile = vs.committed_profile(None)
    if profile is None:
        raise SystemExit("no committed profile of this CPU: run `simtune profile` first (see the README)")
    workload = {**WORKLOAD, "num_requests": QUICK_REQUESTS if quick else WORKLOAD["num_requests"]}
    requests = generate_requests(WorkloadSpec(**workload))
    prompts = prompts_for(requests, workload["seed"])
    decoder = load_decoder(dtype=torch.bfloat16)
    rows = {cfg.label: {"label": cfg.label, "prefix_caching": cfg.deployment.get("prefix_caching", False),
                        "simulated": simulate(cfg, workload, profile), "runs": []} for cfg in CONFIGS}
    for rep in range(repeats):
        for cfg in CONFIGS if rep % 2 == 0 else CONFIGS[::-1]:
            r = vs.run_engine(decoder, cfg, requests, prompts)
            r.pop("step_log")
            rows[cfg.label]["runs"].append(r)
            sim = rows[cfg.label]["simulated"]
            print(f"repeat {rep + 1}/{repeats} {cfg.label:10s} measured {r['output_tokens_per_s']:5.1f} tok/s TTFT p50 "
                  f"{r['ttft_p50_s']:.3f} s TPOT p50 {1e3 * r['tpot_p50_s']:.0f} ms, {r['cached_prompt_tokens']} "
                  f"prompt tokens cached | simulated {sim['output_tokens_per_s']:5.1f} tok/s {sim['ttft_p50_s']:.3f} s "
                  f"{1e3 * sim['tpot_p50_s']:.0f} ms, {sim['cached_prompt_tokens']} cached "
                  f"({r['cpu_stolen'] or 0:.0%} stolen)", flush=True)
    for row in rows.values():
        runs = row.pop("runs")
        row["measured"] = {m: vs.spread([r[m] for r in runs]) for m in vs.METRICS}
        row["measured"]["cached_prompt_tokens"] = runs[0]["cached_prompt_tokens"]
        row["cpu_stolen"] = [r["cpu_stolen"] for r in runs]
        row["error"] = {m: row["simulated"][m] / row["measured"][m]["median"] - 1 for m in vs.METRICS}
    off, on = rows["TP1"], rows["TP1 cached"]
    speedup = {side: {m: (on[side][m] if side == "simulated" else on[side][m]["median"])
                      / (off[side][m] if side == "simulated" else off[side][m]["median"]) for m in vs.METRICS}
               for side in ("measured", "simulated")}
    return {**common.run_fields("serving_prefix", quick, {"repeats": repeats}),
            "load_average_1min": os.getloadavg()[0], "model": vs.MODEL, "dtype": "bf16",
            "profile": profile.name, "workload": {"spec": workload, "lengths": describe_lengths(requests)},
            "rows": list(rows.values()), "speedup": speedup}


def markdown(result: dict[str, Any]) -> str:
    wl, ln = result["workload"]["spec"], result["workload"]["lengths"]
    m = result["machine"]
    lines = ["# Prefix caching: the engine measured vs the serving simulator", "",
             f"SmolLM2-135M ({result['dtype']}) on {m['cpu_model']} ({m['cpu_count']} cores, shared), one rank, one "
             f"thread; {result['repetitions']['repeats']} interleaved repeat(s), median [min, max]. Simulated: "
             f"`simulate_serving` on `1xcpu` with the committed profile `{result['profile']}`. Workload "
             f"`{wl['name']}`: {wl['num_requests']} requests, Poisson {wl['arrival']['rate_per_s']}/s (seed "
             f"{wl['seed']}), each prompt one of {wl['shared_prefix']['groups']} shared prefixes of "
             f"{wl['shared_prefix']['tokens']} tokens then {wl['input_tokens']['min']}-{wl['input_tokens']['max']} "
             f"tokens of its own (mean prompt {ln['input_tokens_mean']:.0f}), outputs "
             f"{wl['output_tokens']['min']}-{wl['output_tokens']['max']}. Error = predicted / measured - 1.", "",
             "| prefix caching | prompt tokens cached, measured | predicted | output tok/s | pred | err "
             "| TTFT p50 s | pred | err | TTFT p90 s | pred | err | TPOT p50 ms | pred | err | TPOT p90 ms | pred | err |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        cells = vs.measured_cells(r)
        lines.append(f"| {'on' if r['prefix_caching'] else 'off'} | {r['measured']['cached_prompt_tokens']} | "
                     f"{r['simulated']['cached_prompt_tokens']} | " + " | ".join(cells) + " |")
    s = result["speedup"]
    lines += ["", "Caching on / off (same session):", "", "| | output tok/s | TTFT p50 | TTFT p90 | TPOT p50 | TPOT p90 |",
              "|---|---:|---:|---:|---:|---:|"]
    for side in ("measured", "simulated"):
        lines.append(f"| {side} | " + " | ".join(f"{s[side][k]:.2f}x" for k in vs.METRICS) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = common.parser(__doc__.splitlines()[0], f"{QUICK_REQUESTS} requests, one repeat", DEFAULT_OUT)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    if args.markdown_only:
        common.rewrite_markdown(args.out, markdown)
        return
    keep_freed_memory()
    result = run(args.quick, 1 if args.quick else args.repeats)
    common.write_results(result, args.out, markdown)
    print(markdown(result))


if __name__ == "__main__":
    main()
