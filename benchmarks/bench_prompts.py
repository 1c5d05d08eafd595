"""Benchmark the prompt-program runtime and the speedup of parallel LLM calls.

(a) Runtime overhead (APPL, Dong et al. 2024, Sec. 6): a local HTTP server answers every
    chat completion after a fixed 0.5 s; ten independent gen() calls through the
    OpenAI-compatible backend should take <= 0.6 s with all ten in flight (APPL measured
    0.57 s for its runtime). Baseline in the same run: one call alone.
(b) Per-call overhead: N calls to a backend that answers at once, through the runtime
    (with and without a trace) vs calling the backend directly; the difference per call
    (APPL: about 6 ms per call).
(c) Workflows (examples/prompts): CoT self-consistency, skeleton-of-thought and the 3-level
    summarization, each run sequentially (max_concurrency 1) and in parallel on the local
    backend (SmolLM2-135M in-process) and through `simtune serve` with the openai backend;
    the measured speedup beside the two predictions from the parallel run's trace (Amdahl
    over stages; the replay on the serving model of smollm2-135m on 1xcpu) and APPL's
    published table (../shared/validation/workflows_appl.csv, other models and hardware:
    for reference only).

Usage: python benchmarks/bench_prompts.py [--quick] [--skip-workflows] [--backends local,serve] [--out PATH]
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import common

sys.path.insert(0, str(common.ROOT / "examples" / "prompts"))

from executor.prompts import Backend, Completion, OpenAIBackend, Runtime, gen  # noqa: E402
from profiler.ranks import free_port  # noqa: E402

DEFAULT_OUT = common.RESULTS / "prompts.json"
FIXED_S = 0.5
APPL = {"cot-sc-10-branches": (10, 9.49), "skeleton-of-thought": (4.3, 2.79), "memwalker-3-level": (3.8, 3.07)}
SERVE_DEPLOYMENT = ("smollm2-135m", "1xcpu", "vllm-tp1")  # what the replay predicts on


# --- (a) overhead against a fixed-latency server ----------------------------------------------------


class _FixedServer:
    def __init__(self, delay_s: float):
        body = json.dumps({"choices": [{"message": {"role": "assistant", "content": "ok"}}],
                           "usage": {"prompt_tokens": 1, "completion_tokens": 1}}).encode()

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self):  # noqa: N802 - http.server's name
                self.rfile.read(int(self.headers["Content-Length"]))
                time.sleep(delay_s)
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        ThreadingHTTPServer.daemon_threads = True
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def bench_overhead(reps: int) -> dict:
    server = _FixedServer(FIXED_S)
    try:
        backend = OpenAIBackend(server.url, "fixed", retries=0)
        with Runtime(backend) as rt:
            str(gen("warm up"))  # connection set-up outside the timing
            one, ten, peaks = [], [], []
            for _ in range(reps):
                t0 = time.perf_counter()
                str(gen("alone"))
                one.append(time.perf_counter() - t0)
                rt.peak_in_flight = 0
                t0 = time.perf_counter()
                answers = [gen(f"call {i}") for i in range(10)]
                for a in answers:
                    str(a)
                ten.append(time.perf_counter() - t0)
                peaks.append(rt.peak_in_flight)
    finally:
        server.close()
    return {"server_delay_s": FIXED_S, "one_call_s": statistics.median(one), "ten_calls_s": statistics.median(ten),
            "ten_calls_all_s": ten, "ratio_ten_over_one": statistics.median(ten) / statistics.median(one),
            "peak_in_flight": min(peaks), "target_s": 0.6, "appl_s": 0.57}


# --- (b) per-call overhead --------------------------------------------------------------------------


class _Instant(Backend):
    name = "instant"
    max_concurrency = 8

    def complete(self, request):
        return Completion("x", 1, 1, [], self.name)


def bench_per_call(n: int) -> dict:
    from executor.prompts import CallRequest

    backend = _Instant()
    request = CallRequest([{"role": "user", "content": "hi"}])
    t0 = time.perf_counter()
    for _ in range(n):
        backend.complete(request)
    direct = time.perf_counter() - t0
    out = {"calls": n, "direct_s": direct}
    for label, trace in (("runtime", None), ("runtime_traced", "trace")):
        with tempfile.TemporaryDirectory() as tmp:
            with Runtime(_Instant(), trace=str(Path(tmp) / "t.jsonl") if trace else None):
                t0 = time.perf_counter()
                calls = [gen("hi") for _ in range(n)]
                for c in calls:
                    str(c)
                out[f"{label}_s"] = time.perf_counter() - t0
        out[f"{label}_overhead_ms_per_call"] = (out[f"{label}_s"] - direct) / n * 1e3
    out["appl_ms_per_call"] = 6.0
    return out


# --- (c) workflows ----------------------------------------------------------------------------------



class _SimtuneServe:
    """`simtune serve` in a child process on a free loopback port, stopped by its PID."""

    def __init__(self):

        self.port = free_port()
        self.proc = subprocess.Popen([sys.executable, "-m", "simtune.cli", "serve", "--model", "smollm2-135m",
                                      "--host", "127.0.0.1", "--port", str(self.port)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        why = common.wait_healthy(self.proc, self.port, 300)
        if why is None:
            return
        if self.proc.poll() is not None:
            raise RuntimeError(f"simtune serve exited: {self.proc.stderr.read()[-2000:]}")
        self.close()
        raise RuntimeError("simtune serve did not become healthy in 300 s")

    def backend(self) -> Backend:
        return OpenAIBackend(f"http://127.0.0.1:{self.port}/v1", "smollm2-135m", retries=2, timeout_s=600)

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def _workflows():
    import cot_sc
    import hierarchical_summary
    import skeleton_of_thought

    return {"cot-sc-10-branches": cot_sc.self_consistency, "skeleton-of-thought": skeleton_of_thought.skeleton_of_thought,
            "memwalker-3-level": hierarchical_summary.hierarchical_summary}


def run_workflow(program, make_backend, max_concurrency: int | None, trace: Path | None) -> tuple[float, int]:
    with Runtime(make_backend(), trace=str(trace) if trace else None, max_concurrency=max_concurrency) as rt:
        t0 = time.perf_counter()
        str(program())
        rt.wait()
        return time.perf_counter() - t0, len(rt.calls)


def bench_workflows(backends: list[str], tmp: Path, only: set[str] | None = None) -> dict:
    from simulator.workflows import dag_from_trace, predict_workflow

    out: dict = {}
    for kind in backends:
        server = _SimtuneServe() if kind == "serve" else None
        try:
            if kind == "local":
                from executor.prompts.local import LocalBackend

                shared = LocalBackend()  # one engine for both runs: load once
                make = lambda shared=shared: _Shared(shared)  # noqa: E731
            else:
                make = server.backend
            rows = {}
            run_workflow(lambda: gen("Say hi.", max_tokens=4), make, None, None)  # load and warm up
            for name, program in _workflows().items():
                if only and name not in only:
                    continue
                trace = tmp / f"{kind}-{name}.jsonl"
                seq_s, calls = run_workflow(program, make, 1, None)
                par_s, _ = run_workflow(program, make, None, trace)
                p = predict_workflow(dag_from_trace(trace), *SERVE_DEPLOYMENT)
                est, meas = APPL[name]
                rows[name] = {"calls": calls, "sequential_s": seq_s, "parallel_s": par_s,
                              "measured_speedup": seq_s / par_s, "amdahl_speedup": p.amdahl_speedup,
                              "simulated_speedup": p.simulated_speedup,
                              "simulated_sequential_s": p.simulated_sequential_s,
                              "simulated_parallel_s": p.simulated_parallel_s,
                              "appl_estimated_speedup": est, "appl_measured_speedup": meas,
                              "load_average": os.getloadavg()[0]}
                print(f"  {kind:6} {name:22} seq {seq_s:6.2f} s  par {par_s:6.2f} s  "
                      f"measured {seq_s / par_s:4.2f}x  Amdahl {p.amdahl_speedup:4.2f}x  "
                      f"replay {p.simulated_speedup:4.2f}x", flush=True)
            out[kind] = rows
            if kind == "local":
                shared.close()
        finally:
            if server is not None:
                server.close()
    return out


class _Shared(Backend):
    """A view of one loaded backend that a Runtime may close without unloading it."""

    def __init__(self, inner: Backend):
        self.inner, self.name, self.max_concurrency = inner, inner.name, inner.max_concurrency

    def complete(self, request):
        return self.inner.complete(request)


def markdown(r: dict) -> str:
    o, c = r["overhead"], r["per_call"]
    lines = ["# Prompt-program runtime", "",
             f"Machine: {r['machine']['cpu_model']} ({r['machine']['cpu_count']} cores).", "",
             "| measurement | result | reference |", "|---|---:|---:|",
             f"| 10 parallel calls, server answering in 0.5 s | {o['ten_calls_s']:.3f} s "
             f"({o['peak_in_flight']} in flight) | target <= 0.6 s; APPL 0.57 s |",
             f"| one call alone (baseline) | {o['one_call_s']:.3f} s | |",
             f"| runtime overhead per call | {c['runtime_overhead_ms_per_call']:.3f} ms | APPL about 6 ms |",
             f"| with the JSONL trace | {c['runtime_traced_overhead_ms_per_call']:.3f} ms | |", ""]
    for kind, rows in r.get("workflows", {}).items():
        lines += [f"## Workflows on the {kind} backend", "",
                  "| workflow | calls | sequential | parallel | measured | Amdahl | replay | APPL est. / measured |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]
        lines += [f"| {n} | {w['calls']} | {w['sequential_s']:.2f} s | {w['parallel_s']:.2f} s | "
                  f"{w['measured_speedup']:.2f}x | {w['amdahl_speedup']:.2f}x | {w['simulated_speedup']:.2f}x | "
                  f"{w['appl_estimated_speedup']}x / {w['appl_measured_speedup']}x |" for n, w in rows.items()]
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    p = common.parser(__doc__.splitlines()[0], "fewer repetitions, no workflows", DEFAULT_OUT)
    p.add_argument("--skip-workflows", action="store_true")
    p.add_argument("--backends", default="local,serve", help="workflow backends: local, serve")
    p.add_argument("--only", default=None, help="rerun these workflows (comma-separated) and keep the other "
                   "rows of the existing results")
    args = p.parse_args()
    if args.markdown_only:
        common.rewrite_markdown(args.out, markdown)
        return
    reps = 2 if args.quick else 5
    result = common.run_fields("prompts", args.quick, {"overhead": reps})
    result["load_average_at_start"] = os.getloadavg()[0]  # other work on the machine
    print("(a) ten calls against a server answering in 0.5 s", flush=True)
    result["overhead"] = bench_overhead(reps)
    print(f"  one {result['overhead']['one_call_s']:.3f} s, ten {result['overhead']['ten_calls_s']:.3f} s "
          f"({result['overhead']['peak_in_flight']} in flight)")
    print("(b) per-call overhead", flush=True)
    result["per_call"] = bench_per_call(500 if args.quick else 2000)
    print(f"  {result['per_call']['runtime_overhead_ms_per_call']:.3f} ms per call "
          f"({result['per_call']['runtime_traced_overhead_ms_per_call']:.3f} ms traced)")
    if not (args.quick or args.skip_workflows):
        print("(c) workflows: sequential vs parallel", flush=True)
        only = {n.strip() for n in args.only.split(",")} if args.only else None
        with tempfile.TemporaryDirectory() as tmp:
            rows = bench_workflows([b.strip() for b in args.backends.split(",") if b.strip()], Path(tmp), only)
        if only and args.out.exists():  # keep the rows not rerun
            kept = json.loads(args.out.read_text()).get("workflows", {})
            for kind, table in rows.items():
                kept.setdefault(kind, {}).update(table)
            rows = kept
        result["workflows"] = rows
    common.write_results(result, args.out, markdown)


if __name__ == "__main__":
    main()
