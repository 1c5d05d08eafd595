"""Speculative decoding inside the serving engine: output tokens/s with each policy against none.

The engine (`executor.serving.engine.Engine`, paged KV, the vllm scheduler, one rank) serves
instruction prompts built on this machine (`executor.serving.prompts`: code tasks that copy
their input, paraphrases, open questions that copy nothing) with n-gram prompt-lookup drafts,
greedy, EOS respected, at most `NEW_TOKENS` output tokens each. For each batch limit b
(`max_num_seqs`), 2b requests arrive at once, so the batch is full for most of the run; every
policy of a deployment's `speculation` runs on the same requests:
- none (the baseline, measured in the same process, interleaved);
- fixed k = 3;
- adaptive: k from the k*(b) table the serving cost model computes for SmolLM2 on the
  committed `1xcpu` profile and the deployment's acceptance model (a fixed 0.6 here);
- adaptive, learned (`learn_acceptance`): the same table rebuilt from the acceptance the
  engine has measured so far, 0.6 being the prior;
- goodput: the k maximizing expected committed tokens per second from each sequence's own
  acceptance record (SmartSpec).
Reported: output tokens/s (end to end, prefill included), its ratio to none at the same b,
the engine's drafted and accepted tokens, and how many sequences equal the baseline's (in
bf16 a verification's matmuls round otherwise than one position's; see the markdown). bf16,
one torch thread.

Usage: python benchmarks/bench_serving_spec_engine.py [--quick] [--repeats N] [--out PATH]
       [--markdown-only]
Writes benchmarks/results/serving_spec_engine.json and .md atomically.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.common import RESULTS, parser, rewrite_markdown, run_fields, write_results  # noqa: E402
from executor.serving.engine import Engine, EngineConfig  # noqa: E402
from executor.serving.model import load_decoder, load_tokenizer  # noqa: E402
from executor.serving.prompts import build_prompts  # noqa: E402
from executor.serving.sampling import SamplingParams  # noqa: E402
from simulator.specs.serving import SpeculationSpec  # noqa: E402

OUT = RESULTS / "serving_spec_engine.json"
NEW_TOKENS = 96
ACCEPTANCE = {"distribution": "fixed", "mean": 0.6}
POLICIES: dict[str, dict[str, Any] | None] = {
    "none": None, "fixed k=3": {"policy": "fixed", "k": 3},
    "adaptive": {"policy": "adaptive", "k_max": 8},
    "adaptive, learned": {"policy": "adaptive", "k_max": 8, "learn_acceptance": True},
    "goodput": {"policy": "goodput", "k_max": 8}}


def run(decoder, tokenizer, prompts: list[list[int]], b: int, policy: dict[str, Any] | None) -> dict[str, Any]:
    spec = None if policy is None else SpeculationSpec(draft="ngram", acceptance=ACCEPTANCE, **policy)
    blocks = sum(-(-(len(p) + NEW_TOKENS + 16) // 16) for p in prompts) + 64
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0)
    with Engine(decoder, EngineConfig(max_num_seqs=b, num_blocks=blocks, speculation=spec, seed=0), tokenizer) as eng:
        t0 = time.perf_counter()
        seqs = eng.generate(prompts, params)
        seconds = time.perf_counter() - t0
        sp = eng.spec.speculator if eng.spec is not None else None
        out = sum(len(s.output_ids) for s in seqs)
        return {"seconds": seconds, "output_tokens": out, "tokens_per_s": out / seconds,
                "drafted": sp.drafted if sp else 0, "accepted": sp.accepted if sp else 0,
                "outputs": [list(s.output_ids) for s in seqs]}


def main() -> None:
    p = parser(__doc__.splitlines()[0], "b = 1 and 4 only, one repetition", OUT)
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()
    if args.markdown_only:
        rewrite_markdown(args.out, markdown)
        return
    torch.set_num_threads(1)
    batches = (1, 4) if args.quick else (1, 4, 16)
    repeats = 1 if args.quick else args.repeats
    tokenizer = load_tokenizer()
    decoder = load_decoder(dtype=torch.bfloat16)
    prompts = [list(q.ids) for q in build_prompts(tokenizer, 2 * max(batches), max_prompt_tokens=300)]
    load_start = os.getloadavg()[0]
    runs: dict[int, dict[str, list[dict[str, Any]]]] = {b: {name: [] for name in POLICIES} for b in batches}
    for rep in range(repeats):
        for b in batches:
            names = list(POLICIES) if rep % 2 == 0 else list(reversed(POLICIES))
            for name in names:
                r = run(decoder, tokenizer, prompts[:2 * b], b, POLICIES[name])
                runs[b][name].append(r)
                print(f"rep {rep} b={b:2d} {name:10s} {r['tokens_per_s']:6.1f} output tok/s "
                      f"({r['output_tokens']} tokens, {r['seconds']:.1f} s; accepted {r['accepted']}/{r['drafted']})",
                      flush=True)
    rows = []
    for b in batches:
        base = runs[b]["none"]
        for name, rs in runs[b].items():
            tps = [r["tokens_per_s"] for r in rs]
            rows.append({"batch": b, "policy": name, "tokens_per_s": {"median": statistics.median(tps), "runs": tps},
                         "ratio_to_none": statistics.median(r["tokens_per_s"] / n["tokens_per_s"] for r, n in zip(rs, base)),
                         "drafted": rs[0]["drafted"], "accepted": rs[0]["accepted"],
                         "identical_to_none": sum(a == c for a, c in zip(rs[0]["outputs"], base[0]["outputs"])),
                         "sequences": len(base[0]["outputs"])})
    result = {**run_fields("serving_spec_engine", args.quick, {"repeats": repeats}),
              "load_average_1min": {"before": load_start, "after": os.getloadavg()[0]},
              "workload": {"requests_per_batch_limit": "2b", "max_tokens": NEW_TOKENS, "greedy": True,
                           "prompts": "executor.serving.prompts (code tasks, paraphrases, open questions)",
                           "acceptance_model": ACCEPTANCE, "dtype": "bf16", "threads": 1},
              "rows": rows}
    write_results(result, args.out, markdown)


def markdown(result: dict[str, Any]) -> str:
    m, load = result["machine"], result["load_average_1min"]
    lines = ["# Speculative decoding inside the serving engine (n-gram drafts, greedy)", "",
             f"Measured {result['timestamp']} on {m['cpu_model']} ({m['cpu_count']} cores), SmolLM2-135M in bf16, one "
             f"torch thread; for each batch limit b, 2b requests at once, at most {result['workload']['max_tokens']} "
             f"output tokens each; {result['repetitions']['repeats']} interleaved repetition(s), median. One-minute "
             f"load {load['before']:.1f} before, {load['after']:.1f} after. Run with "
             "`python benchmarks/bench_serving_spec_engine.py`.", "",
             "| b | policy | output tok/s | / none | drafts accepted | sequences identical to none's |",
             "|---:|---|---:|---:|---:|---:|"]
    for r in result["rows"]:
        acc = "-" if not r["drafted"] else f"{r['accepted']}/{r['drafted']} ({r['accepted'] / r['drafted']:.0%})"
        lines.append(f"| {r['batch']} | {r['policy']} | {r['tokens_per_s']['median']:.1f} | {r['ratio_to_none']:.2f} "
                     f"| {acc} | {r['identical_to_none']}/{r['sequences']} |")
    lines += ["", "In bf16 a verification computes k + 1 positions of a sequence in one forward, whose matmuls "
              "round differently from one position at a time, so near-ties can flip and a sequence part from the "
              "baseline's from there; in fp32 greedy output with speculation equals the output without it token "
              "for token (tests/test_serving_speculation.py)."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
