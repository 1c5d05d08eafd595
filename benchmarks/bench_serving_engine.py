"""The serving engine offline: output tokens/s on a batch of requests, against the static decoder.

Workload (the issue's offline batch): 64 prompts of about 100 tokens (90-110, seeded random
token ids) x 128 greedy output tokens each, EOS ignored, all arriving at once.
- engine: `Engine.generate` with the vllm scheduler, max_num_seqs 64, paged KV (16-token
  blocks): prefill, continuous batching and sampling, timed end to end;
- baseline, measured in the same run: the static batched decoder that the speculation
  benchmarks use (`continuous.serve` without drafts over a contiguous `KVCache`, prompts
  prefilled one at a time by `PromptBank`), prefill included.
Both in bf16 and fp32; configurations interleaved and repeated (median and spread). Also
reported: the time per decode step spent getting KV into contiguous tensors for attention (the
cost of paging on a CPU: gathers of blocks into the decode working copy when the decoding set
changes, and appends to it), and whether the two produce the same greedy tokens.

With `--against REV` the engine is also run with the model runner of an earlier commit (its
executor/serving/{model,paged,runner,decode_kv}.py, read with `git show`, the rest of the engine as now),
interleaved with the others: before/after of a change to the runner, measured in one session.

Run: `python benchmarks/bench_serving_engine.py` (about 10 min on 2 cores); `--quick` for 16
prompts x 32 tokens. vLLM-CPU is measured by benchmarks/bench_serving_peer.py.
"""

from __future__ import annotations

import importlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import RESULTS, ROOT, parser, rewrite_markdown, run_fields, write_results  # noqa: E402
from executor.serving.continuous import PromptBank, serve  # noqa: E402
from executor.serving.engine import Engine, EngineConfig  # noqa: E402
from executor.serving.model import load_decoder  # noqa: E402
from executor.serving.sampling import SamplingParams  # noqa: E402

OUT = RESULTS / "serving_engine.json"


def prompts_of(n: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(90, 111, (n,), generator=g).tolist()
    return [torch.randint(100, 40000, (m,), generator=g).tolist() for m in lengths]


def runner_at(rev: str, folder: Path):
    """The `PagedRunner` class of commit `rev`, with the model, paged and decode_kv modules of that commit."""
    pkg = folder / f"serving_at_{abs(hash(rev))}"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    for name in ("model", "paged", "runner", "decode_kv"):
        src = subprocess.run(["git", "show", f"{rev}:executor/serving/{name}.py"], cwd=ROOT, capture_output=True,
                             text=True)
        if src.returncode and name == "decode_kv":   # before the decode working copy: the runner gathers
            continue
        if src.returncode:
            raise SystemExit(f"--against {rev}: {src.stderr.strip()}")
        text = src.stdout
        for mod in ("model", "paged", "decode_kv"):
            text = text.replace(f"executor.serving.{mod}", f"{pkg.name}.{mod}")
        (pkg / f"{name}.py").write_text(text)
    sys.path.insert(0, str(folder))
    return importlib.import_module(f"{pkg.name}.runner").PagedRunner


def run_engine(decoder, prompts, new_tokens: int, runner_cls=None) -> dict:
    eng = Engine(decoder, EngineConfig(max_num_seqs=len(prompts), num_blocks=len(prompts) * 16, block_size=16,
                                       max_batched_tokens=4096))
    if runner_cls is not None:
        eng.runner = runner_cls(decoder, eng.kv)
    t0 = time.perf_counter()
    outs = eng.generate(prompts, SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True))
    seconds = time.perf_counter() - t0
    decode_steps = eng.stats.steps["decode"]
    return {"seconds": seconds, "output_tokens": sum(len(o.output_ids) for o in outs),
            "steps": dict(eng.stats.steps), "step_s": eng.stats.step_s,
            "gather_s": eng.runner.gather_s, "gather_ms_per_decode_step": 1e3 * eng.runner.gather_s / max(decode_steps, 1),
            "outputs": [o.output_ids for o in outs]}


def run_static(decoder, prompts, new_tokens: int) -> dict:
    t0 = time.perf_counter()
    bank = PromptBank.build(decoder, prompts)
    res = serve(decoder, bank, list(range(len(prompts))), len(prompts), None, lambda b: 0,
                max_new_tokens=new_tokens, eos_id=-1)
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "output_tokens": sum(len(r.output) for r in res.requests),
            "prefill_s": bank.prefill_s, "outputs": [r.output for r in res.requests]}


def summary(xs: list[float]) -> dict:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "runs": xs}


def main() -> None:
    p = parser(__doc__.splitlines()[0], "16 prompts x 32 tokens, one repetition", OUT)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--against", metavar="REV", help="also run the engine with the model runner of commit REV")
    p.add_argument("--dtypes", default="bf16,fp32", help="comma-separated: bf16, fp32")
    args = p.parse_args()
    if args.markdown_only:
        rewrite_markdown(args.out, markdown)
        return
    n, new = (16, 32) if args.quick else (64, 128)
    repeats = 1 if args.quick else args.repeats
    torch.set_num_threads(args.threads)
    prompts = prompts_of(n)
    dtypes = {"bf16": torch.bfloat16, "fp32": torch.float32}
    if not set(args.dtypes.split(",")) <= set(dtypes):
        raise SystemExit(f"--dtypes {args.dtypes}: allowed are bf16, fp32 (comma-separated)")
    decoders = {d: load_decoder(dtype=dtypes[d]) for d in args.dtypes.split(",")}
    tmp = tempfile.TemporaryDirectory(prefix="bench-engine-")
    before = runner_at(args.against, Path(tmp.name)) if args.against else None
    kinds = ("engine", "static") + (("before",) if before else ())
    runs: dict[str, dict[str, list[dict]]] = {d: {k: [] for k in kinds} for d in decoders}
    for rep in range(repeats):  # interleaved: each repetition runs every configuration once
        for dname, dec in decoders.items():
            order = kinds if rep % 2 == 0 else tuple(reversed(kinds))
            for kind in order:
                load_before = os.getloadavg()[0]
                r = (run_static(dec, prompts, new) if kind == "static" else
                     run_engine(dec, prompts, new, before if kind == "before" else None))
                r["load1"] = [load_before, os.getloadavg()[0]]
                runs[dname][kind].append(r)
                print(f"rep {rep} {dname:4s} {kind:6s} {r['output_tokens'] / r['seconds']:7.1f} output tok/s "
                      f"({r['seconds']:.1f} s)", flush=True)
    loads = [x for by_kind in runs.values() for rs in by_kind.values() for r in rs for x in r["load1"]]
    rows = {}
    for dname, by_kind in runs.items():
        eng, sta = by_kind["engine"], by_kind["static"]
        tps_e = [r["output_tokens"] / r["seconds"] for r in eng]
        tps_s = [r["output_tokens"] / r["seconds"] for r in sta]
        same = sum(a == b for a, b in zip(eng[0]["outputs"], sta[0]["outputs"]))
        rows[dname] = {
            "engine_output_tokens_per_s": summary(tps_e), "static_output_tokens_per_s": summary(tps_s),
            "ratio_engine_over_static": summary([e / s for e, s in zip(tps_e, tps_s)]),
            "gather_ms_per_decode_step": summary([r["gather_ms_per_decode_step"] for r in eng]),
            "gather_fraction_of_step_time": summary([r["gather_s"] / r["step_s"] for r in eng]),
            "engine_steps": eng[0]["steps"], "static_prefill_s": summary([r["prefill_s"] for r in sta]),
            "same_greedy_outputs": f"{same}/{len(prompts)}",
        }
        if before:
            tps_b = [r["output_tokens"] / r["seconds"] for r in by_kind["before"]]
            rows[dname] |= {"before_output_tokens_per_s": summary(tps_b),
                            "speedup_over_before": summary([e / b for e, b in zip(tps_e, tps_b)])}
    result = {**run_fields("serving_engine", args.quick, {"repeats": repeats}),
              "workload": {"prompts": n, "prompt_tokens": "90-110", "output_tokens": new, "greedy": True,
                           "torch_threads": args.threads, "max_num_seqs": n, "scheduler": "vllm",
                           "before": args.against},
              "load1": {"min": min(loads), "max": max(loads)}, "results": rows}
    write_results(result, args.out, markdown)


def markdown(result: dict) -> str:
    w = result["workload"]
    lines = [f"# Serving engine, offline batch ({w['prompts']} prompts of {w['prompt_tokens']} tokens x "
             f"{w['output_tokens']} greedy output tokens, {w['torch_threads']} threads)", "",
             f"Measured {result['timestamp']} on {result['machine']['cpu_model']} "
             f"({result['machine']['cpu_count']} cores, shared); {result['repetitions']['repeats']} interleaved "
             "repetitions, median [min, max]" + (f"; one-minute load average {result['load1']['min']:.1f}-"
                                                  f"{result['load1']['max']:.1f} around the runs" if "load1" in result
                                                  else "") + ".", "",
             "| dtype | engine output tok/s | static decoder output tok/s | engine / static | KV gather + append ms "
             "per decode step | its share of step time | static decoder's prefill s | same greedy tokens |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]

    def cell(s: dict, fmt: str = "{:.1f}") -> str:
        return f"{fmt.format(s['median'])} [{fmt.format(s['min'])}, {fmt.format(s['max'])}]"

    for d, r in result["results"].items():
        lines.append(f"| {d} | {cell(r['engine_output_tokens_per_s'])} | {cell(r['static_output_tokens_per_s'])} | "
                     f"{cell(r['ratio_engine_over_static'], '{:.2f}')} | {cell(r['gather_ms_per_decode_step'])} | "
                     f"{cell(r['gather_fraction_of_step_time'], '{:.1%}')} | {cell(r['static_prefill_s'])} | "
                     f"{r['same_greedy_outputs']} |")
    if w.get("before"):
        lines += ["", f"The engine with the model runner of `{w['before']}` (before), measured in the same run:", "",
                  "| dtype | before output tok/s | now output tok/s | now / before |", "|---|---:|---:|---:|"]
        lines += [f"| {d} | {cell(r['before_output_tokens_per_s'])} | {cell(r['engine_output_tokens_per_s'])} | "
                  f"{cell(r['speedup_over_before'], '{:.2f}')} |" for d, r in result["results"].items()]
    lines += ["", "Both include prefill. The static decoder prefills prompts one at a time into a contiguous "
              "cache and decodes the whole batch with one padded forward per token; the engine prefills "
              "through the shared vllm scheduler (whole prompts within max_batched_tokens) and decodes from a "
              "contiguous working copy of the KV, gathered from the blocks when the decoding set changes or its "
              "longest sequence enters a new block, appended to in place otherwise. The last column counts "
              "sequences whose greedy "
              "tokens are identical between the two: in fp32 they must all be (tested); in bf16 a different "
              "rounding anywhere can flip a near-tie, and the sequence parts from there.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
