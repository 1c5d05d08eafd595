"""Serving measured vs simulated on this machine: the real engine against `simtune simulate serve`.

What runs (in one process, `python benchmarks/bench_serving_vs_sim.py`, ~35 min; `--quick` < 3 min):

```
same-run profile  (profiler families the serving model reads, timed now, into a temporary folder)
      |                                                   workload specs (Poisson, fixed seed)
      v                                                         |  generate_requests: the same
simulate_serving(smollm2-135m, Nxcpu + that profile,            |  arrival times, prompt and
                 deployment, workload)          <---------------+  output lengths for both sides
                                                                |
Engine(SmolLM2-135M bf16, EngineConfig.from_deployment)  <------+  prompts: seeded random token ids,
  1 thread per rank, gloo on 127.0.0.1 for 2-rank layouts            greedy, EOS ignored
      |
      v
measured vs predicted: output tokens/s, TTFT and TPOT p50/p90 (the simulator's own report
formulas on the engine's sequences), and per engine step: measured time vs the iteration
model's time for the same batch (which phase misses: prefill, decode, host, communication)
```

Deployments: static TP1, PP2 and TP2 on a short-prompt Poisson load; on a long-prompt Poisson
load the same static layouts and the re-sharding deployment (PP2 prefill -> TP2 decode,
seesaw); the static layouts again on an offline batch (all requests at once, so that the
output throughput is the steps', not the arrivals'); "Seesaw for real": whether re-sharding beats the best static layout, measured,
beside the simulator's verdict for the same pair. A deployment the engine cannot run yet
(`EngineConfig.from_deployment` refuses it with a SpecError) is still simulated; its row
says why it was not measured, so the same command picks it up once the engine runs it.

The prediction uses the committed profile of this CPU (`profiler.store.this_machines_profile`:
the catalog profile whose CPU model is this machine's; `--profile DIR` names another), as a
user's `simtune simulate serve` would. Beside it, the same deployments are predicted from the
profile families the serving model reads measured again before each repeat (`PROFILE_OPS`,
quick sweeps; `--no-same-run` skips them): the prediction of the machine of this run, not of
the committed profile's day. Without a committed profile of this CPU the same-run profile is
the prediction. The machine is shared: configurations are interleaved and repeated (median,
min and max), and the one-minute load average is recorded before and after every engine run,
with the share of CPU time the hypervisor stole meanwhile (`common.stolen_share`; up to a fifth
in some minutes of this virtual machine, none in others). Every request's measured and predicted
TTFT and TPOT are kept (the run of median throughput): a percentile of a few requests can sit
between two clusters of them, and the per-request errors say how the typical request fares.
Targets: throughput within 15%, latency percentiles within 25% (error = predicted / measured - 1).

Usage: python benchmarks/bench_serving_vs_sim.py [--quick] [--repeats N] [--only LABEL,...]
       [--profile DIR] [--no-same-run] [--out PATH] [--markdown-only]
Writes benchmarks/results/serving_vs_sim.json and .md atomically.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import common  # noqa: E402
import torch  # noqa: E402

from executor.allocator import keep_freed_memory  # noqa: E402
from executor.serving.engine import Engine, EngineConfig  # noqa: E402
from executor.serving.model import load_decoder  # noqa: E402
from executor.serving.parallel import Comm  # noqa: E402
from executor.serving.sampling import SamplingParams  # noqa: E402
from profiler import gemm  # noqa: E402
from profiler.context import ProfileContext  # noqa: E402
from profiler.run import fit_profile, op_module  # noqa: E402
from profiler.store import ProfileStore, this_machines_profile  # noqa: E402
from simulator.errors import SpecError  # noqa: E402
from simulator.serving.iteration import IterationModel  # noqa: E402
from simulator.serving.report import percentiles  # noqa: E402
from simulator.serving.simulate import simulate_serving  # noqa: E402
from simulator.serving.workload import describe_lengths, generate_requests  # noqa: E402
from simulator.specs.catalog import load_cluster, load_model  # noqa: E402
from simulator.specs.profile import PROFILES_DIR, load_profile, read_meta  # noqa: E402
from simulator.specs.serving import DeploymentSpec, EngineSpec, WorkloadSpec  # noqa: E402

DEFAULT_OUT = common.RESULTS / "serving_vs_sim.json"
MODEL = "smollm2-135m"
THROUGHPUT_TARGET, LATENCY_TARGET = 0.15, 0.25
METRICS = ("output_tokens_per_s", "ttft_p50_s", "ttft_p90_s", "tpot_p50_s", "tpot_p90_s")
PROFILE_OPS = ("decode", "collectives", "memory", "attention", "gemm")  # what the serving model reads
THREADS_PER_RANK = 1   # the Nxcpu clusters: one core, one thread per rank
TOKEN_RANGE = (100, 40000)   # prompt token ids are drawn from here (ordinary vocabulary)

# Poisson loads with a fixed seed. Short: chat-like prompts, the static layouts compared.
# Long: prompts 4-8x longer with short answers, where re-sharding should matter.
WORKLOADS: dict[str, dict[str, Any]] = {
    "short": {"name": "poisson-short", "num_requests": 32, "arrival": {"kind": "poisson", "rate_per_s": 0.75},
              "input_tokens": {"distribution": "uniform", "min": 64, "max": 256},
              "output_tokens": {"distribution": "uniform", "min": 16, "max": 64}, "seed": 0},
    "long": {"name": "poisson-long", "num_requests": 20, "arrival": {"kind": "poisson", "rate_per_s": 0.2},
             "input_tokens": {"distribution": "uniform", "min": 512, "max": 1024},
             "output_tokens": {"distribution": "uniform", "min": 16, "max": 48}, "seed": 1},
    # all at once: throughput set by the steps, not by the arrivals (the Poisson loads' is)
    "offline": {"name": "offline", "num_requests": 32, "arrival": {"kind": "offline"},
                "input_tokens": {"distribution": "uniform", "min": 90, "max": 110},
                "output_tokens": {"distribution": "fixed", "value": 64}, "seed": 3},
}
QUICK_REQUESTS = {"short": 8, "long": 4, "offline": 8}
LIMITS = {"scheduler": "vllm", "max_num_seqs": 32, "max_batched_tokens": 2048, "block_size": 16}


@dataclass(frozen=True)
class Config:
    label: str
    workload: str
    deployment: dict[str, Any]
    quick: bool = True   # run under --quick too

    def spec(self) -> DeploymentSpec:
        return DeploymentSpec(**{**LIMITS, **self.deployment})

    @property
    def ranks(self) -> int:
        return self.spec().devices_per_replica


TP1, PP2, TP2 = ({"prefill": {"tp": 1, "pp": 1}}, {"prefill": {"tp": 1, "pp": 2}}, {"prefill": {"tp": 2, "pp": 1}})
RESHARD = {"prefill": {"tp": 1, "pp": 2}, "decode": {"tp": 2, "pp": 1}, "scheduler": "seesaw", "cpu_kv_buffer_GB": 1.0}
CONFIGS = [
    Config("TP1", "short", TP1), Config("PP2", "short", PP2), Config("TP2", "short", TP2),
    Config("TP1 long", "long", TP1, quick=False), Config("PP2 long", "long", PP2, quick=False),
    Config("TP2 long", "long", TP2), Config("PP2->TP2 long", "long", RESHARD),
    Config("TP1 offline", "offline", TP1), Config("PP2 offline", "offline", PP2, quick=False),
    Config("TP2 offline", "offline", TP2, quick=False),
]
STATIC_LONG = ("TP1 long", "PP2 long", "TP2 long")
RESHARDING = "PP2->TP2 long"


# --- the workload both sides read ------------------------------------------------------------
def workload_spec(name: str, quick: bool) -> dict[str, Any]:
    spec = dict(WORKLOADS[name])
    if quick:
        spec["num_requests"] = QUICK_REQUESTS[name]
    return spec


def prompts_for(requests, seed: int) -> list[list[int]]:
    """Seeded random token ids of each request's prompt length (the engine's side)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(*TOKEN_RANGE, (r.input_tokens,), generator=g).tolist() for r in requests]


# --- the same-run profile ----------------------------------------------------------------------
def profile_shapes(op: str, ctx: ProfileContext) -> list[dict[str, Any]]:
    """The shapes of family `op` that the serving model of SmolLM2 reads: each family's quick
    sweep in bf16 (the 16-bit weights and KV the simulator assumes), GEMMs only of SmolLM2's
    layers and LM head (prefill rows and decode's streaming rows), the decoder's decode steps
    and host row (not its verify and prefill rows), and of the collectives the all-reduce (TP)
    and the send/recv (PP) of 2 ranks."""
    if op == "gemm":
        mnk = (gemm.model_shapes((MODEL,), gemm.CPU_QUICK_TOKENS, gemm.CPU_QUICK_MAX_FLOPS)
               + gemm.stream_shapes((MODEL,), gemm.STREAM_QUICK_ROWS, gemm.CPU_QUICK_MAX_FLOPS))
        return [{"m": m, "n": n, "k": k, "dtype": "bf16"} for m, n, k in mnk]
    shapes = op_module(op).sweep(ctx)
    if op == "decode":
        return [s for s in shapes if s["phase"] in ("decode", "host")]
    if op == "collectives":
        return [s for s in shapes if s["collective"] in ("all_reduce", "send_recv")]
    return shapes


def same_run_profile(root: Path) -> dict[str, Any]:
    """`PROFILE_OPS` measured now into a new profile directory (the profiler's own store,
    families and fits; only the shapes are chosen here), one thread per rank."""
    t0, cpu0 = time.perf_counter(), common.cpu_times()
    load = os.getloadavg()[0]
    torch.set_num_threads(THREADS_PER_RANK)
    ctx = ProfileContext(device="cpu", quick=True, threads=THREADS_PER_RANK, ranks=(2,), dtypes=("bf16",))
    store = ProfileStore.open(root, "cpu", THREADS_PER_RANK, PROFILE_OPS)
    for op in PROFILE_OPS:
        table = store.table(op)
        for row in op_module(op).measure(ctx, [s for s in profile_shapes(op, ctx) if not table.has(s)]):
            table.add(row)
    fits = fit_profile(root)
    decode = fits.get("decode", {})
    allreduce = fits.get("collectives", {}).get("gloo", {}).get("all_reduce", {}).get("2", {})
    return {"ops": list(PROFILE_OPS), "seconds": time.perf_counter() - t0,
            "load_average_1min": {"before": load, "after": os.getloadavg()[0]},
            "cpu_stolen": common.stolen_share(cpu0, common.cpu_times()),
            "rows": {op: len(store.table(op).rows) for op in PROFILE_OPS},
            "decode_step_overhead_s": decode.get("step_overhead_s"), "decode_intercept_s": decode.get("intercept_s"),
            "gloo_allreduce_alpha_s": allreduce.get("alpha_s"),
            "gloo_allreduce_bus_bytes_per_s": allreduce.get("bus_bytes_per_s"),
            "fit_errors": {op: f.get("cv_median_abs_error") for op, f in fits.items()}}


# --- the simulator's side --------------------------------------------------------------------------
def engine_spec(profile: Path) -> EngineSpec:
    """The engine the simulator is told it simulates: this one (executor/serving), whose steps
    do not overlap (the next decode needs this step's tokens), so a pipeline fills and drains
    every step; its CPU time per step is the profile's host step time (the `decode` family's
    tiny-width decoder), as for the device without an engine; its layers run eagerly (one
    kernel per element-wise op)."""
    decode = load_profile(profile).fit("decode") or {}
    return EngineSpec(name="simtune executor/serving", source=f"host step of the profile {profile.name}",
                      step_overhead_us=1e6 * float(decode.get("step_overhead_s", 0.0)), pipeline_overlap=False,
                      eager=True)


def simulated_spec(cfg: Config, profile: Path) -> DeploymentSpec:
    return cfg.spec().model_copy(update={"engine": engine_spec(profile)})


def simulate(cfg: Config, workload: dict[str, Any], profile: Path) -> dict[str, Any]:
    cluster = load_cluster(f"{cfg.ranks}xcpu", profile=profile)
    rep = simulate_serving(MODEL, cluster, simulated_spec(cfg, profile), workload)
    return {**metrics_of(rep.output_tokens_per_s, rep.ttft_s, rep.tpot_s), "makespan_s": rep.makespan_s,
            "steps": rep.steps, "preemptions": rep.preemptions, "transitions": rep.transitions,
            "transition_time_s": rep.transition_time_s,
            "per_request": {k: rep.per_request[k] for k in ("ttft_s", "tpot_s")}}


def metrics_of(tokens_per_s: float, ttft: dict[str, float], tpot: dict[str, float]) -> dict[str, float]:
    return {"output_tokens_per_s": tokens_per_s, "ttft_p50_s": ttft["p50"], "ttft_p90_s": ttft["p90"],
            "tpot_p50_s": tpot["p50"], "tpot_p90_s": tpot["p90"]}


# --- the engine's side -----------------------------------------------------------------------------
def engine_config(cfg: Config, requests) -> EngineConfig:
    """The engine settings of the deployment, with a KV pool that holds every request at once
    (no preemption on either side: the simulator's pool is the device memory, far larger)."""
    blocks = sum(math.ceil((r.input_tokens + r.output_tokens) / LIMITS["block_size"]) + 1 for r in requests)
    return EngineConfig.from_deployment(cfg.spec(), num_blocks=blocks + 64, seed=0)


class StepLog:
    """Each engine step: its kind and batch (the `Step` the engine records, static or
    re-sharding alike), the step's wall time, the model part of it (from the record's start,
    after scheduling, to its end, after sampling), and the CPU time of the thread that ran it.
    torch runs one intra-op thread here, so rank 0's share of the step's work runs on that
    thread: CPU / wall is the share of a core the step got on the shared machine, near 1 when
    it is quiet (lower on 2 ranks, where rank 0 also waits for its peer). Re-sharding
    transitions are timed apart."""

    def __init__(self, eng: Engine):
        self.rows: list[dict[str, Any]] = []
        self.transitions: list[float] = []
        self._last: tuple | None = None
        record, step = eng._record, eng.step

        def recorded(plan, start, end, emitted, prompt_tokens):
            self._last = (plan.kind, list(plan.works), end - start)
            return record(plan, start, end, emitted, prompt_tokens)

        def stepped():
            self._last = None
            t0, c0 = time.perf_counter(), time.thread_time()
            out = step()
            if self._last is not None:
                kind, works, model_s = self._last
                self.rows.append({"kind": kind, "works": works, "step_s": time.perf_counter() - t0,
                                  "model_s": model_s, "cpu_s": time.thread_time() - c0})
            return out

        eng._record, eng.step = recorded, stepped
        if eng.reshard is not None:
            transition = eng.reshard._transition

            def timed_transition(phase):
                t0 = time.perf_counter()
                transition(phase)
                self.transitions.append(time.perf_counter() - t0)

            eng.reshard._transition = timed_transition


@contextlib.contextmanager
def timed_all_reduces() -> Iterator[list[float]]:
    """Seconds of every tensor-parallel all-reduce rank 0 runs meanwhile (in this process; the
    runners bind `Comm.all_reduce` when they are built, so the engine is built inside)."""
    times: list[float] = []
    original = Comm.all_reduce

    def timed(comm, t):
        t0 = time.perf_counter()
        out = original(comm, t)
        times.append(time.perf_counter() - t0)
        return out

    Comm.all_reduce = timed
    try:
        yield times
    finally:
        Comm.all_reduce = original


def all_reduce_summary(times: list[float]) -> dict[str, float] | None:
    if not times:
        return None
    ordered = sorted(times)
    return {"count": len(times), "mean_s": statistics.fmean(times), "median_s": statistics.median(times),
            "p90_s": ordered[int(0.9 * (len(ordered) - 1))], "sum_s": sum(times)}


def run_engine(decoder, cfg: Config, requests, prompts: list[list[int]]) -> dict[str, Any]:
    """Serve the requests at their arrival times; the simulator's report formulas on the result."""
    load_before, cpu_before = os.getloadavg()[0], common.cpu_times()
    with timed_all_reduces() as all_reduces, Engine(decoder, engine_config(cfg, requests)) as eng:
        # warm-up: two short requests through prefill and decode (pp micro-batches, all-reduces),
        # of tokens in an order no request's prompt opens with (nothing for a prefix cache to keep)
        eng.generate([prompts[0][31::-1], prompts[1][47::-1]], SamplingParams(max_tokens=4, temperature=0.0,
                                                                              ignore_eos=True))
        all_reduces.clear()
        log = StepLog(eng)
        seqs = [eng.add_request(p, SamplingParams(max_tokens=r.output_tokens, temperature=0.0, ignore_eos=True),
                                arrival_s=r.arrival_s) for r, p in zip(requests, prompts)]
        eng.t0 = eng.clock()
        eng.run_until_done()
        all_reduce = all_reduce_summary(all_reduces)
    stolen = common.stolen_share(cpu_before, common.cpu_times())
    wrong = [s.id for s in seqs if len(s.output_ids) != s.req.output_tokens]
    if wrong:
        raise RuntimeError(f"{cfg.label}: {len(wrong)} requests ended early (first {wrong[:3]})")
    start = min(r.arrival_s for r in requests)
    makespan = max(s.finish_s for s in seqs) - start
    ttft = [s.first_token_s - s.req.arrival_s for s in seqs]
    tpot = [(s.finish_s - s.first_token_s) / (s.req.output_tokens - 1) for s in seqs if s.req.output_tokens > 1]
    out = sum(r.output_tokens for r in requests)
    steps: dict[str, int] = {}
    for row in log.rows:
        steps[row["kind"]] = steps.get(row["kind"], 0) + 1
    return {**metrics_of(out / makespan, percentiles(ttft), percentiles(tpot)), "makespan_s": makespan,
            "steps": steps, "preemptions": eng.scheduler.preemptions, "step_log": log.rows,
            "transitions": len(log.transitions), "transition_time_s": sum(log.transitions), "all_reduce": all_reduce,
            "per_request": {"ttft_s": ttft, "tpot_s": tpot}, "cached_prompt_tokens": eng.stats.cached_prompt_tokens,
            "load_average_1min": {"before": load_before, "after": os.getloadavg()[0]}, "cpu_stolen": stolen}


def step_attribution(cfg: Config, log: list[dict[str, Any]], profile: Path) -> dict[str, Any]:
    """Per step kind: measured seconds (whole step, its forward, the host part outside the
    forward) against the iteration model's seconds for the same batches, on this run's profile."""
    model, cluster = load_model(MODEL), load_cluster(f"{cfg.ranks}xcpu", profile=profile)
    spec = simulated_spec(cfg, profile)
    layouts = {"prefill": IterationModel(model, cluster, spec.prefill, spec.engine),
               "decode": IterationModel(model, cluster, spec.decode, spec.engine)}
    out: dict[str, Any] = {}
    for kind in sorted({r["kind"] for r in log}):
        rows = [r for r in log if r["kind"] == kind]
        it = layouts["decode" if kind == "decode" else "prefill"]
        predicted = [it.step_s(r["works"]) for r in rows]
        ratios = [r["step_s"] / p for r, p in zip(rows, predicted) if p > 0]
        out[kind] = {"steps": len(rows), "measured_s": sum(r["step_s"] for r in rows),
                     "host_s": sum(r["step_s"] - r["model_s"] for r in rows),
                     "cpu_s": sum(r["cpu_s"] for r in rows), "predicted_s": sum(predicted),
                     "predicted_overhead_s": len(rows) * it.overhead.step_s,
                     "median_measured_over_predicted": statistics.median(ratios) if ratios else None,
                     "median_cpu_over_predicted": statistics.median(r["cpu_s"] / p for r, p in zip(rows, predicted)),
                     "mean_sequences": statistics.fmean(len(r["works"]) for r in rows),
                     "mean_new_tokens": statistics.fmean(sum(w.new_tokens for w in r["works"]) for r in rows)}
    return out


# --- the run -----------------------------------------------------------------------------------------
def spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": values}


def committed_profile(given: Path | None) -> Path | None:
    """The profile the prediction is made from: the directory given with --profile, else the
    committed profile of this CPU, else None (then each repeat's same-run profile)."""
    if given is not None:
        return given
    name = this_machines_profile(THREADS_PER_RANK)
    return None if name is None else PROFILES_DIR / name


def repeat_profile(tmp: Path, rep: int) -> tuple[Path, dict[str, Any]]:
    """A profile measured now, before the repeat (the load of a shared machine moves within
    minutes)."""
    root = tmp / f"profile-{rep}"
    print(f"same-run profile before repeat {rep + 1}:", ", ".join(PROFILE_OPS), flush=True)
    info = same_run_profile(root)
    print(f"  {info['seconds']:.0f} s; step overhead {1e3 * (info['decode_step_overhead_s'] or 0):.1f} ms, "
          f"gloo all-reduce alpha {1e6 * (info['gloo_allreduce_alpha_s'] or 0):.0f} us", flush=True)
    return root, info


def run(quick: bool, repeats: int, only: list[str] | None, given_profile: Path | None,
        same_run: bool = True) -> dict[str, Any]:
    torch.set_num_threads(THREADS_PER_RANK)
    load_before = os.getloadavg()[0]
    committed = committed_profile(given_profile)
    same_run = same_run or committed is None
    configs = [c for c in CONFIGS if (c.quick or not quick) and (only is None or c.label in only)]
    tmp = Path(tempfile.mkdtemp(prefix="simtune-bench-serving-"))
    profiles: list[tuple[Path, dict[str, Any]]] = []
    try:
        workloads = {name: workload_spec(name, quick) for name in {c.workload for c in configs}}
        requests = {name: generate_requests(WorkloadSpec(**wl)) for name, wl in workloads.items()}
        prompts = {name: prompts_for(reqs, WORKLOADS[name]["seed"]) for name, reqs in requests.items()}
        decoder = load_decoder(dtype=torch.bfloat16)
        rows, runnable = [], []
        for cfg in configs:
            row = {"label": cfg.label, "workload": cfg.workload, "deployment": cfg.spec().to_dict(),
                   "ranks": cfg.ranks, "simulated_runs": []}
            try:
                engine_config(cfg, requests[cfg.workload])
                runnable.append(cfg)
                row["runs"] = []
            except SpecError as err:
                row["not_measured"] = str(err)
            rows.append(row)
        by_label = {r["label"]: r for r in rows}
        if committed is not None:
            for row, cfg in zip(rows, configs):
                row["simulated"] = simulate(cfg, workloads[cfg.workload], committed)
        for rep in range(repeats):  # interleaved; every other repeat in reverse order
            if same_run:
                profiles.append(repeat_profile(tmp, rep))
                for row, cfg in zip(rows, configs):
                    row["simulated_runs"].append(simulate(cfg, workloads[cfg.workload], profiles[-1][0]))
            profile_dir = committed or profiles[-1][0]
            for cfg in runnable if rep % 2 == 0 else runnable[::-1]:
                try:
                    r = run_engine(decoder, cfg, requests[cfg.workload], prompts[cfg.workload])
                except Exception as err:  # noqa: BLE001 - a failing layout is a row's finding, not the run's end
                    by_label[cfg.label].setdefault("failures", []).append(f"{type(err).__name__}: {err}")
                    print(f"repeat {rep + 1}/{repeats} {cfg.label}: FAILED {type(err).__name__}: {err}", flush=True)
                    continue
                r["repeat"] = rep
                r["step_attribution"] = step_attribution(cfg, r.pop("step_log"), profile_dir)
                by_label[cfg.label]["runs"].append(r)
                sim = by_label[cfg.label].get("simulated") or by_label[cfg.label]["simulated_runs"][-1]
                print(f"repeat {rep + 1}/{repeats} {cfg.label:14s} measured {r['output_tokens_per_s']:6.1f} tok/s "
                      f"TTFT p50 {r['ttft_p50_s']:.3f} s TPOT p50 {1e3 * r['tpot_p50_s']:.0f} ms | simulated "
                      f"{sim['output_tokens_per_s']:6.1f} tok/s {sim['ttft_p50_s']:.3f} s {1e3 * sim['tpot_p50_s']:.0f} ms"
                      f" (load {r['load_average_1min']['before']:.1f}-{r['load_average_1min']['after']:.1f}, "
                      f"{r['cpu_stolen'] or 0:.0%} stolen)",
                      flush=True)
        for row, cfg in zip(rows, configs):
            row["deployment"] = simulated_spec(cfg, committed or profiles[0][0]).to_dict()
            sims = row.pop("simulated_runs")
            if sims:
                median = {**sims[0], **{m: statistics.median(x[m] for x in sims) for m in (*METRICS, "makespan_s")}}
                median.pop("per_request")
                row["simulated_same_run" if committed is not None else "simulated"] = median
            if "runs" not in row:
                continue
            if row["runs"]:
                summarize(row)
            else:
                row.pop("runs")
                row["not_measured"] = "the engine failed on every repeat: " + row["failures"][0].splitlines()[-1]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {**common.run_fields("serving_vs_sim", quick, {"repeats": repeats}),
            "load_average_1min": {"before": load_before, "after": os.getloadavg()[0]},
            "model": MODEL, "dtype": "bf16", "threads_per_rank": THREADS_PER_RANK,
            "profile": None if committed is None else {"dir": committed.name if committed.parent == PROFILES_DIR
                                                       else str(committed), "device": read_meta(committed)["device"]},
            "same_run_profiles": [info for _, info in profiles],
            "targets": {"throughput": THROUGHPUT_TARGET, "latency": LATENCY_TARGET},
            "workloads": {name: {"spec": wl, "lengths": describe_lengths(requests[name])} for name, wl in workloads.items()},
            "limits": LIMITS, "rows": rows, "seesaw": seesaw_verdict(by_label)}


def summarize(row: dict[str, Any]) -> None:
    """Median and spread over the repeats, errors of the simulator's median prediction (each
    repeat predicted from the profile measured just before it) against the measured median, and
    the step attribution of the run of median throughput; the per-run details are dropped."""
    runs = row.pop("runs")
    row["measured"] = {m: spread([r[m] for r in runs]) for m in (*METRICS, "makespan_s")}
    row["measured"]["steps"] = runs[0]["steps"]
    row["measured"]["preemptions"] = max(r["preemptions"] for r in runs)
    row["measured"]["transitions"] = max(r["transitions"] for r in runs)
    row["measured"]["transition_time_s"] = spread([r["transition_time_s"] for r in runs])
    if all(r.get("all_reduce") for r in runs):   # rank 0's all-reduces inside the engine, per run
        row["measured"]["all_reduce"] = {k: spread([r["all_reduce"][k] for r in runs])
                                         for k in ("count", "mean_s", "median_s", "p90_s", "sum_s")}
    row["load_average_1min"] = [r["load_average_1min"] for r in runs]
    row["cpu_stolen"] = [r["cpu_stolen"] for r in runs]
    sim = row["simulated"]
    row["error"] = {m: sim[m] / row["measured"][m]["median"] - 1 for m in METRICS}
    if "simulated_same_run" in row:
        row["error_same_run"] = {m: row["simulated_same_run"][m] / row["measured"][m]["median"] - 1 for m in METRICS}
    row["within_target"] = {m: abs(e) <= (THROUGHPUT_TARGET if m == "output_tokens_per_s" else LATENCY_TARGET)
                            for m, e in row["error"].items()}
    median_run = sorted(runs, key=lambda r: r["output_tokens_per_s"])[len(runs) // 2]
    row["steps_measured_vs_predicted"] = median_run["step_attribution"]
    row["per_request"] = per_request_errors(median_run["per_request"], sim.pop("per_request"))


def per_request_errors(measured: dict[str, list[float]], simulated: dict[str, list[float]]) -> dict[str, Any]:
    """Request by request (the same requests, in arrival order; the run of median throughput):
    the median of |predicted / measured - 1| of TTFT and TPOT, and the share of requests
    predicted within the latency target. A percentile of a few requests can flip between two
    clusters of values (a request whose decode a long prefill interrupts, or not); the
    per-request errors show how far the typical request's prediction is."""
    out: dict[str, Any] = {"measured": measured, "simulated": simulated}
    for key in ("ttft_s", "tpot_s"):
        errors = [abs(p / m - 1) for p, m in zip(simulated[key], measured[key]) if m > 0]
        out[key] = {"median_abs_error": statistics.median(errors),
                    "within_target": sum(e <= LATENCY_TARGET for e in errors) / len(errors)}
    return out


def seesaw_verdict(by_label: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Re-sharding against the best static layout on the long-prompt load: measured and simulated."""
    statics = [by_label[s] for s in STATIC_LONG if s in by_label]
    reshard = by_label.get(RESHARDING)
    if not statics or reshard is None:
        return {"compared": False, "why": "the long-prompt rows did not run"}
    out: dict[str, Any] = {"resharding": RESHARDING}
    sim_best = max(statics, key=lambda r: r["simulated"]["output_tokens_per_s"])
    out["simulated"] = {"best_static": sim_best["label"],
                        "best_static_tokens_per_s": sim_best["simulated"]["output_tokens_per_s"],
                        "resharding_tokens_per_s": reshard["simulated"]["output_tokens_per_s"]}
    out["simulated"]["speedup"] = out["simulated"]["resharding_tokens_per_s"] / out["simulated"]["best_static_tokens_per_s"]
    measured = [r for r in statics if "measured" in r]
    if "measured" not in reshard or not measured:
        out["measured"] = None
        out["why_not_measured"] = reshard.get("not_measured") or "no static layout was measured"
        return out
    best = max(measured, key=lambda r: r["measured"]["output_tokens_per_s"]["median"])
    m_best, m_re = best["measured"]["output_tokens_per_s"], reshard["measured"]["output_tokens_per_s"]
    repeats = len(m_re["runs"])
    out["measured"] = {"best_static": best["label"], "best_static_tokens_per_s": m_best["median"],
                       "resharding_tokens_per_s": m_re["median"], "speedup": m_re["median"] / m_best["median"],
                       # the repeats' ranges overlap: the difference is inside the noise (None: one repeat)
                       "inside_noise": (m_re["min"] <= m_best["max"] and m_best["min"] <= m_re["max"]) if repeats > 1 else None}
    out["transitions"] = {"measured": reshard["measured"]["transitions"],
                          "measured_time_s": reshard["measured"]["transition_time_s"]["median"],
                          "simulated": reshard["simulated"]["transitions"],
                          "simulated_time_s": reshard["simulated"]["transition_time_s"]}
    return out


# --- markdown ----------------------------------------------------------------------------------------
METRIC_CELLS = (("output_tokens_per_s", 1, "{:.1f}"), ("ttft_p50_s", 1, "{:.3f}"), ("ttft_p90_s", 1, "{:.3f}"),
                ("tpot_p50_s", 1e3, "{:.0f}"), ("tpot_p90_s", 1e3, "{:.0f}"))   # key, scale to the unit shown, format


def measured_cells(row: dict[str, Any]) -> list[str]:
    """Per metric of a measured row: median [min, max] measured, predicted, error (marked ✗
    outside the target where the row says whether it is within)."""
    cells = []
    for key, scale, fmt in METRIC_CELLS:
        meas = row["measured"][key]
        mark = "" if row.get("within_target", {}).get(key, True) else " ✗"
        cells += [f"{fmt.format(scale * meas['median'])} [{fmt.format(scale * meas['min'])}, "
                  f"{fmt.format(scale * meas['max'])}]", fmt.format(scale * row["simulated"][key]),
                  f"{row['error'][key]:+.0%}{mark}"]
    return cells


def _lengths(dist: dict[str, Any]) -> str:
    return str(dist["value"]) if dist.get("distribution") == "fixed" else f"{dist['min']}-{dist['max']}"


def markdown(result: dict[str, Any]) -> str:
    m, load = result["machine"], result["load_average_1min"]
    profs = result.get("same_run_profiles", [])
    committed = result.get("profile")
    same_run = (f"the profile families {', '.join(PROFILE_OPS)} measured in the same run, before each repeat "
                f"(the median of the repeats' predictions)")
    if committed is None:
        source = same_run
    else:
        source = (f"the committed profile `{committed['dir']}` (measured {committed['device'].get('date', '?')[:10]} "
                  f"on {committed['device'].get('name')}, {committed['device'].get('threads')} thread)")
        if profs:
            source += f"; the errors from {same_run} follow the table"
    lines = ["# Serving: the real engine measured vs the serving simulator, on this machine", "",
             f"SmolLM2-135M ({result['dtype']}) on {m['cpu_model']} ({m['cpu_count']} cores, shared), one thread per "
             f"rank, gloo on 127.0.0.1 between ranks; {result['repetitions']['repeats']} interleaved repeat(s), "
             f"median [min, max]. Simulated: `simulate_serving` on `Nxcpu` with {source}. "
             f"Error = predicted / measured - 1; targets: throughput within "
             f"{result['targets']['throughput']:.0%}, latency percentiles within {result['targets']['latency']:.0%}. "
             f"One-minute load average {load['before']:.1f} before and {load['after']:.1f} after the run.", ""]
    for wl in result["workloads"].values():
        s, ln = wl["spec"], wl["lengths"]
        arrival = (f"Poisson {s['arrival']['rate_per_s']}/s" if s["arrival"].get("kind") == "poisson"
                   else "all at once")
        lines.append(f"- `{s['name']}`: {s['num_requests']} requests, {arrival} (seed {s['seed']}), prompts "
                     f"{_lengths(s['input_tokens'])} tokens (mean {ln['input_tokens_mean']:.0f}), outputs "
                     f"{_lengths(s['output_tokens'])} (mean {ln['output_tokens_mean']:.0f})")
    lines += ["", "Load: the one-minute load average before and after the engine runs, and the share of the CPU time "
              "the machine wanted that the hypervisor gave to other guests (stolen; the median of the repeats). A "
              "profile measured in a minute with little stolen time predicts a run with much of it too fast.",
              "", "| deployment | ranks | load (stolen) | output tok/s measured | predicted | err | TTFT p50 s | pred | err "
              "| TTFT p90 s | pred | err | TPOT p50 ms | pred | err | TPOT p90 ms | pred | err |",
              "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        sim = r["simulated"]
        if "measured" not in r:
            cells = []
            for key, scale, fmt in METRIC_CELLS:
                cells += ["-", fmt.format(scale * sim[key]), "-"]
            lines.append(f"| {r['label']} | {r['ranks']} | not measured | " + " | ".join(cells) + " |")
            continue
        loads = r["load_average_1min"]
        lo, hi = min(x["before"] for x in loads), max(x["after"] for x in loads)
        cells = measured_cells(r)
        stolen = [x for x in r.get("cpu_stolen", []) if x is not None]
        steal = f" ({statistics.median(stolen):.0%})" if stolen else ""
        lines.append(f"| {r['label']} | {r['ranks']} | {lo:.1f}-{hi:.1f}{steal} | " + " | ".join(cells) + " |")
    same = [r for r in result["rows"] if "error_same_run" in r]
    if same:
        lines += ["", "Errors of the same-run profile's prediction (median of the repeats):", "",
                  "| deployment | output tok/s | TTFT p50 | TTFT p90 | TPOT p50 | TPOT p90 |", "|---|---:|---:|---:|---:|---:|"]
        for r in same:
            lines.append(f"| {r['label']} | " + " | ".join(f"{r['error_same_run'][k]:+.0%}" for k in METRICS) + " |")
    by_request = [r for r in result["rows"] if "per_request" in r]
    if by_request:
        lines += ["", "Request by request (the run of median throughput, each request's prediction against its "
                  "measurement): the median error, and the share of requests predicted within "
                  f"{result['targets']['latency']:.0%}. Where a percentile misses while most requests are "
                  "predicted well, it sits between two clusters of requests (a decode a long prefill "
                  "interrupted, or not) and a few requests changed sides.", "",
                  "| deployment | TTFT median error | TTFT within | TPOT median error | TPOT within |",
                  "|---|---:|---:|---:|---:|"]
        for r in by_request:
            t, d = r["per_request"]["ttft_s"], r["per_request"]["tpot_s"]
            lines.append(f"| {r['label']} | {t['median_abs_error']:.0%} | {t['within_target']:.0%} "
                         f"| {d['median_abs_error']:.0%} | {d['within_target']:.0%} |")
    missing = [r for r in result["rows"] if "measured" not in r]
    if missing:
        lines += ["", "Not measured (the engine refuses the deployment today; simulated only):"]
        lines += [f"- {r['label']}: {r['not_measured']}" for r in missing]
    lines += ["", "Where the time goes, per engine step kind (the run of median throughput): measured seconds in "
              "steps (of which outside the model step: scheduling, block tables, re-sharding transitions), the CPU "
              "time of rank 0's engine thread in them, against the "
              "iteration model's seconds for the very same batches.", "",
              "| deployment | kind | steps | mean seqs | mean new tokens | measured s | host s | rank 0 CPU s "
              "| rank 0 CPU share | predicted s | median step measured / predicted | rank 0 CPU / predicted |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        for kind, a in r.get("steps_measured_vs_predicted", {}).items():
            ratio = "-" if a["median_measured_over_predicted"] is None else f"{a['median_measured_over_predicted']:.2f}"
            lines.append(f"| {r['label']} | {kind} | {a['steps']} | {a['mean_sequences']:.1f} | {a['mean_new_tokens']:.0f} "
                         f"| {a['measured_s']:.2f} | {a['host_s']:.2f} | {a['cpu_s']:.2f} | {a['cpu_s'] / a['measured_s']:.0%} "
                         f"| {a['predicted_s']:.2f} | {ratio} "
                         f"| {a['median_cpu_over_predicted']:.2f} |")
    timed = [r for r in result["rows"] if r.get("measured", {}).get("all_reduce")]
    if timed:
        alphas = [q.get("gloo_allreduce_alpha_s") for q in profs if q.get("gloo_allreduce_alpha_s")]
        lines += ["", "Tensor-parallel all-reduces timed on rank 0 inside the engine (median over the repeats; the "
                  "same-run profiles' fit: " + ("-" if not alphas else ", ".join(f"{1e3 * a:.2f}" for a in alphas)
                                                + " ms latency, from the mean of back-to-back calls") + "):", "",
                  "| deployment | all-reduces | mean ms | median ms | p90 ms | seconds in all |", "|---|---:|---:|---:|---:|---:|"]
        for r in timed:
            a = r["measured"]["all_reduce"]
            lines.append(f"| {r['label']} | {a['count']['median']:.0f} | {1e3 * a['mean_s']['median']:.2f} | "
                         f"{1e3 * a['median_s']['median']:.2f} | {1e3 * a['p90_s']['median']:.2f} | {a['sum_s']['median']:.1f} |")
    s = result["seesaw"]
    lines += ["", "## Seesaw for real", ""]
    if not s.get("compared", True):
        lines.append(s["why"])
    else:
        sim = s["simulated"]
        lines.append(f"Simulated: {RESHARDING} {sim['resharding_tokens_per_s']:.1f} output tok/s vs the best static "
                     f"layout ({sim['best_static']}) {sim['best_static_tokens_per_s']:.1f}: {sim['speedup']:.2f}x.")
        if s["measured"] is None:
            lines.append(f"Measured: not yet ({s['why_not_measured']}).")
        else:
            me = s["measured"]
            noise = {True: " (the repeats' ranges overlap: inside the noise).", False: " (the repeats' ranges do not "
                     "overlap).", None: " (one repeat: the noise was not measured)."}[me["inside_noise"]]
            lines.append(f"Measured: {me['resharding_tokens_per_s']:.1f} vs {me['best_static']} "
                         f"{me['best_static_tokens_per_s']:.1f}: {me['speedup']:.2f}x" + noise)
            tr = s.get("transitions") or {}
            if tr:
                lines.append(f"Transitions: {tr['measured']} measured taking {tr['measured_time_s']:.2f} s in all, "
                             f"{tr['simulated']} simulated taking {tr['simulated_time_s']:.2f} s.")
    measured_profiles = [q for q in profs if isinstance(q.get("seconds"), float)]
    if measured_profiles:
        lines.append("")
    for i, q in enumerate(measured_profiles):
        stolen = "" if q.get("cpu_stolen") is None else f", {q['cpu_stolen']:.0%} stolen"
        lines.append(f"Same-run profile {i + 1}: {q['seconds']:.0f} s at load {q['load_average_1min']['before']:.1f}-"
                     f"{q['load_average_1min']['after']:.1f}{stolen}; host time of a decoder step "
                     f"{1e3 * (q['decode_step_overhead_s'] or 0):.1f} ms, gloo all-reduce latency (2 ranks) "
                     f"{1e6 * (q['gloo_allreduce_alpha_s'] or 0):.0f} us.")
    lines.append("")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = common.parser(__doc__.splitlines()[0], "fewer requests, one repeat, the long TP1 and PP2 rows left out", DEFAULT_OUT)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--only", help="comma-separated row labels to run (default: all)")
    p.add_argument("--profile", type=Path, help="the profile directory to predict from (default: the committed "
                   "profile of this CPU)")
    p.add_argument("--no-same-run", action="store_true", help="do not measure a profile before each repeat")
    args = p.parse_args()
    if args.markdown_only:
        common.rewrite_markdown(args.out, markdown)
        return
    only = [s.strip() for s in args.only.split(",")] if args.only else None
    keep_freed_memory()   # as the engine's own process (replica_main) and its rank workers do
    result = run(args.quick, 1 if args.quick else args.repeats, only, args.profile, not args.no_same_run)
    common.write_results(result, args.out, markdown)


if __name__ == "__main__":
    main()
