"""Speculative decoding under continuous batching on this CPU: measured k*(b) against the model.

SmolLM2-135M-Instruct in our decoder (`executor.serving`), n-gram prompt-lookup drafts,
greedy. Unlike `bench_speculative.py` (static batches that drain), every run here keeps b
rows busy: a finished request's row takes the next waiting one (`executor.serving.continuous`),
and throughput is measured over the rounds that ran with the batch full, the steady state a
serving engine lives in and the cost model describes. Parts:

(1) Profile: one target forward for b sequences x n tokens (b in 1..32, n in 1..9) at the
    workload's mean context, and one draft proposal per b (median of 5 after a warm-up).
(2) Per workload class ("code": comment / type-hints / test tasks, which copy their input;
    "mixed": every prompt kind): per-request acceptance from one k = 4 pass, then for every
    (b, k) a run of 2b + 6 requests; steady tokens/s, each also as a ratio to k = 0 at the same
    b in the same process.
(3) The model: `simulator.speculation.policy_table` on the measured step costs and the
    class's per-request acceptance rates only (never the measured throughputs) predicts
    k*(b); the adaptive policy with that table is then run for real at every b.

Usage: python benchmarks/bench_speculative_serving.py [--quick] [--out PATH]
Writes JSON (default benchmarks/results/speculative_serving_cpu.json) and markdown atomically.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import common
import torch
from bench_speculative import NGRAM, fit_profile, log, profile_draft, profile_target

from executor.serving.continuous import PromptBank, serve
from executor.serving.drafts import NgramDrafter
from executor.serving.model import load_decoder, load_tokenizer
from executor.serving.prompts import build_prompts
from executor.serving.speculative import fixed_k, table_policy
from simulator.specs.serving import AcceptanceSpec
from simulator.speculation import MeasuredStepCost, policy_table

DEFAULT_OUT = common.RESULTS / "speculative_serving_cpu.json"
MODEL = "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized to fp32)"
CLASSES = {"code": ("comment", "type-hints", "test"), "mixed": None}
FULL = {"batch_sizes": (1, 2, 4, 8, 16, 32), "tokens": tuple(range(1, 10)), "max_new_tokens": 40,
        "ks": {"code": (0, 1, 2, 3, 4, 6, 8), "mixed": (0, 1, 2, 4)}, "reps": 5, "prompts": 64}
QUICK = {"batch_sizes": (1, 4), "tokens": (1, 2, 3, 4, 5), "max_new_tokens": 12,
         "ks": {"code": (0, 2, 4), "mixed": (0, 2)}, "reps": 2, "prompts": 16}
ACCEPTANCE_K = 4


def requests_for(b: int, pool: list[int]) -> list[int]:
    """2b + 6 requests cycling through the class's prompts: enough to keep b rows busy for a
    while after the first ones finish."""
    return [pool[i % len(pool)] for i in range(2 * b + 6)]


def run(decoder, bank, order, b, drafter, policy, max_new: int) -> dict:
    res = serve(decoder, bank, order, b, drafter, policy, max_new_tokens=max_new)
    return {"steady_tokens_per_s": res.steady_tokens_per_s(), "steady_rounds": res.steady_rounds(),
            "rounds": len(res.rounds), "run_tokens_per_s": res.output_tokens_per_s(),
            "acceptance_rate": res.acceptance_rate(), "_result": res}


def measure_class(decoder, bank, drafter, pool: list[int], cfg: dict, ks, cost: MeasuredStepCost,
                  previous: dict | None = None) -> dict:
    """Acceptance, the grid and the adaptive runs of one workload class; with `previous` (the
    same class of an earlier run), its acceptance and grid are kept and only the model table
    and the adaptive runs are redone (after re-profiling)."""
    max_new = cfg["max_new_tokens"]
    if previous is None:
        log(f"  acceptance pass (k = {ACCEPTANCE_K}) over {len(pool)} prompts")
        acc_run = serve(decoder, bank, pool, min(16, len(pool)), drafter, fixed_k(ACCEPTANCE_K), max_new_tokens=max_new)
        rates = [r.acceptance_rate for r in acc_run.requests if r.acceptance_rate is not None]
        pooled = acc_run.acceptance_rate()
    else:
        rates, pooled = previous["acceptance"]["per_request"], previous["acceptance"]["pooled"]
    grid = [] if previous is None else previous["grid"]
    for b in cfg["batch_sizes"] if previous is None else ():
        order = requests_for(b, pool)
        base = None
        for k in ks:
            point = run(decoder, bank, order, b, drafter, fixed_k(k), max_new)
            point.pop("_result")
            base = base or point["steady_tokens_per_s"]
            grid.append({"batch_size": b, "k": k, "output_tokens_per_s": point["steady_tokens_per_s"],
                         "ratio_to_k0": point["steady_tokens_per_s"] / base, **point})
            log(f"  b={b:2d} k={k}: {point['steady_tokens_per_s']:7.1f} tok/s steady "
                f"({point['steady_tokens_per_s'] / base:.2f}x k=0), {point['steady_rounds']} full rounds, "
                f"acceptance {point['acceptance_rate'] or 0:.2f}")
    clipped = [min(max(a, 1e-3), 1 - 1e-3) for a in rates]
    table = policy_table(cost, AcceptanceSpec(distribution="empirical", values=clipped), cfg["batch_sizes"],
                         max(ks), cost.context)
    model_k = table.as_dict()
    adaptive = []
    for b in cfg["batch_sizes"]:
        point = run(decoder, bank, requests_for(b, pool), b, drafter, table_policy(model_k), max_new)
        point.pop("_result")
        fixed = {r["k"]: r["output_tokens_per_s"] for r in grid if r["batch_size"] == b}
        best_k = max(fixed, key=fixed.get)
        adaptive.append({"batch_size": b, "policy": {str(k): v for k, v in model_k.items()},
                         "output_tokens_per_s": point["steady_tokens_per_s"], "best_fixed_k": best_k,
                         "ratio_to_best_fixed": point["steady_tokens_per_s"] / fixed[best_k],
                         "ratio_to_k0": point["steady_tokens_per_s"] / fixed[0], **point})
        log(f"  adaptive b={b:2d} (k*={model_k[b]}): {point['steady_tokens_per_s']:7.1f} tok/s = "
            f"{adaptive[-1]['ratio_to_best_fixed']:.2f}x the best fixed k = {best_k}")
    return {"prompts": pool, "ks": list(ks),
            "acceptance": {"k": ACCEPTANCE_K, "per_request": rates, "pooled": pooled},
            "grid": grid, "model_table": {str(k): v for k, v in model_k.items()}, "adaptive": adaptive}


def markdown(result: dict) -> str:
    lines = ["<!-- generated by benchmarks/bench_speculative_serving.py from its JSON; do not edit -->", "",
             f"Measured on {common.md_escape(result['machine'].get('cpu_model', 'this CPU'))} ({result['threads']} threads), "
             f"{result['timestamp']}. {result['model']}, n-gram drafts, greedy, {result['max_new_tokens']} new tokens "
             "per request, continuous batching (a finished row takes the next request); tokens/s over the rounds "
             "with all b rows busy. Ratios are to k = 0 at the same b, same process. Model: k*(b) predicted from "
             "the measured step costs and per-request acceptance only.", ""]
    for name, cls in result["classes"].items():
        ks = cls["ks"]
        a = cls["acceptance"]
        lines += [f"### {name} prompts ({len(cls['prompts'])}; acceptance at k = {a['k']}: pooled "
                  f"{a['pooled']:.2f}, per request {min(a['per_request']):.2f}..{max(a['per_request']):.2f})", "",
                  "| b | " + " | ".join(f"k={k}" for k in ks) + " | measured best k | model k* | adaptive (model table) vs best fixed |",
                  "|---:|" + "---:|" * (len(ks) + 3)]
        adaptive = {r["batch_size"]: r for r in cls["adaptive"]}
        for b in sorted({r["batch_size"] for r in cls["grid"]}):
            row = {r["k"]: r for r in cls["grid"] if r["batch_size"] == b}
            best = max(row, key=lambda k: row[k]["output_tokens_per_s"])
            cells = [f"{row[k]['output_tokens_per_s']:.1f} ({row[k]['ratio_to_k0']:.2f}x)" for k in ks]
            ad = adaptive[b]
            lines.append(f"| {b} | " + " | ".join(cells) + f" | {best} | {cls['model_table'][str(b)]} | "
                         f"{ad['output_tokens_per_s']:.1f} ({ad['ratio_to_best_fixed']:.2f}x) |")
        lines.append("")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    """Measured and predicted speedup by k, per batch size, for each workload class (PNG,
    written atomically)."""
    import os
    import tempfile

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from simulator.speculation import measurement_view
    from simulator.speculation.plots import plot_model_vs_measured

    classes = list(result["classes"])
    fig, axes = plt.subplots(len(classes), 2, figsize=(11, 3.6 * len(classes)), sharey="row", squeeze=False)
    for row, name in zip(axes, classes):
        plot_model_vs_measured(measurement_view(result, name), row)
        row[0].set_title(f"{name} prompts: measured (stars: best k)")
    fig.tight_layout()
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".png")
    os.close(fd)
    fig.savefig(tmp, dpi=100)
    os.replace(tmp, path)
    plt.close(fig)
    log(f"wrote {path}")


def main(argv: list[str] | None = None) -> dict:
    p = common.parser(__doc__.splitlines()[0], "b in {1,4}, few k, 12 new tokens, 16 prompts", DEFAULT_OUT)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--reprofile", action="store_true",
                   help="keep the grid and acceptance of --out; redo the profile, the model tables and "
                        "the adaptive runs (for a profile disturbed by other load)")
    args = p.parse_args(argv)
    if args.markdown_only:
        result = common.rewrite_markdown(args.out, markdown)
        plot(result, Path(args.out).with_suffix(".png"))
        return result
    cfg = dict(QUICK if args.quick else FULL)
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    decoder, tokenizer = load_decoder(), load_tokenizer()
    prompts = build_prompts(tokenizer, cfg["prompts"])
    drafter = NgramDrafter(**NGRAM)
    log(f"prefilling {len(prompts)} prompts once")
    bank = PromptBank.build(decoder, [list(x.ids) for x in prompts])
    context = int(round(statistics.fmean(len(x.ids) for x in prompts) + cfg["max_new_tokens"] / 2))
    log("(1) profile")
    profile = {"context": context,
               "target": profile_target(decoder, cfg["batch_sizes"], cfg["tokens"], context, cfg["reps"]),
               "draft": profile_draft(decoder, drafter, prompts, cfg["batch_sizes"], context, cfg["reps"]),
               "draft_note": "n-gram: one proposal of 8 tokens for every sequence / 8"}
    profile["fit"] = fit_profile(profile["target"])
    cost = MeasuredStepCost(profile)
    previous = json.loads(Path(args.out).read_text()) if args.reprofile else None
    result = {**common.run_fields("speculative_serving", args.quick, {"profile_median_of": cfg["reps"]}),
              "model": MODEL, "draft": {"kind": "ngram", **NGRAM}, "threads": torch.get_num_threads(),
              "max_new_tokens": cfg["max_new_tokens"], "prefill_s": bank.prefill_s,
              "batching": "continuous: b rows, a finished request's row takes the next waiting one; "
                          "2b + 6 requests per run; steady = rounds with all b rows busy and requests waiting",
              "profile": profile, "classes": {}}
    for name, kinds in CLASSES.items():
        pool = [i for i, x in enumerate(prompts) if kinds is None or x.kind in kinds]
        log(f"(2) class {name}: {len(pool)} prompts")
        result["classes"][name] = measure_class(decoder, bank, drafter, pool, cfg, cfg["ks"][name], cost,
                                                previous["classes"][name] if previous else None)
    if previous:
        result["reprofiled"] = {"grid_measured": previous["timestamp"], "first_profile": previous["profile"]}
    result["wall_s"] = time.perf_counter() - t_start
    common.write_results(result, args.out, markdown)
    plot(result, Path(args.out).with_suffix(".png"))
    print(markdown(result))
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
