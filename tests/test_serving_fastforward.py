"""Fast-forward through runs of identical decode steps gives the step-by-step results: every
catalog deployment on every catalog workload, and the cases that end runs (preemption by
recompute and by swap, arrivals, data and pipeline parallel replicas, each speculation
policy), request by request; plus the trace, the `--exact-steps` switch and the progress bar;
Seesaw's decode phase the same way; and the scalar step-time model of short runs against the
array one, bit for bit."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from typer.testing import CliRunner

from simtune.cli import app
from simulator.serving import seesaw, simulate
from simulator.serving.iteration import BatchSums, IterationModel
from simulator.serving.simulate import simulate_serving
from simulator.specs.catalog import (
    catalog_names,
    load_cluster,
    load_deployment,
    load_model,
    load_workload,
)
from simulator.specs.serving import DeploymentSpec, Parallel

DEPLOYMENTS = catalog_names("deployments")["deployments"]
WORKLOADS = catalog_names("workloads")["workloads"]
MODEL = "llama-3-8b"  # shares its tokenizer with the speculative deployment's draft


@pytest.fixture
def run(monkeypatch):
    """simulate_serving, returning the report and each request's (TTFT, TPOT, finish time,
    preemptions, tokens generated)."""
    seen = {}
    real = simulate.build_report

    def build_report(model, cluster, deployment, workload, seqs, stats):
        seen["seqs"] = seqs
        return real(model, cluster, deployment, workload, seqs, stats)

    monkeypatch.setattr(simulate, "build_report", build_report)

    def go(*args, **kwargs):
        report = simulate_serving(*args, **kwargs)
        per_request = [(s.first_token_s - s.req.arrival_s,
                        (s.finish_s - s.first_token_s) / max(s.req.output_tokens - 1, 1),
                        s.finish_s, s.preemptions, s.generated) for s in seen["seqs"]]
        return report, per_request

    return go


def assert_same(run, *args, **kwargs):
    """The fast-forward and step-by-step runs agree on every request and the whole report."""
    fast, fast_requests = run(*args, **kwargs)
    exact, exact_requests = run(*args, exact_steps=True, **kwargs)
    assert len(fast_requests) == len(exact_requests)
    for i, (f, e) in enumerate(zip(fast_requests, exact_requests)):
        assert f[:3] == pytest.approx(e[:3], rel=1e-9, abs=0), f"request {i}: TTFT, TPOT, finish"
        assert f[3:] == e[3:], f"request {i}: preemptions, tokens"
    assert_close(fast.to_dict(timelines=True), exact.to_dict(timelines=True))
    return fast


def assert_close(a, b, where: str = "report") -> None:
    """Equal structures, floats to a relative 1e-9."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_close(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_close(x, y, f"{where}[{i}]")
    elif isinstance(a, float):
        assert math.isclose(a, b, rel_tol=1e-9) or (math.isnan(a) and math.isnan(b)), f"{where}: {a} != {b}"
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def devices(deployment: str) -> int:
    d = load_deployment(deployment)
    return d.dp * max(d.prefill.tp * d.prefill.pp, d.decode.tp * d.decode.pp)


@pytest.mark.parametrize("workload", WORKLOADS)
@pytest.mark.parametrize("deployment", DEPLOYMENTS)
def test_every_catalog_deployment_and_workload_gives_the_step_by_step_results(run, deployment, workload):
    dep = load_deployment(deployment).to_dict()
    if dep["scheduler"] == "vllm":  # long prompts need a budget that holds them without chunking
        dep["max_batched_tokens"] = 16384
    report = assert_same(run, MODEL, f"{devices(deployment)}xa100-80gb", dep,
                         {"preset": None, **_small(workload)})
    assert report.num_requests == _small(workload)["num_requests"]


def _small(workload: str) -> dict:
    """The catalog workload with few requests (at a rate that still queues them)."""
    w = load_workload(workload).to_dict()
    w["num_requests"] = 12 if w.get("preset") == "arxiv-summarization-like" else 40
    if w["arrival"].get("kind") == "poisson":
        w["arrival"] = {**w["arrival"], "rate_per_s": 20.0}
    return w


@pytest.mark.parametrize("deployment", [
    {"gpu_memory_utilization": 0.2, "preemption": "recompute"},
    {"gpu_memory_utilization": 0.2, "preemption": "swap", "cpu_kv_buffer_GB": 4},
    {"gpu_memory_utilization": 0.2, "scheduler": "sarathi", "chunk_size": 256},
])
def test_memory_tight_runs_preempt_at_the_same_steps(run, deployment):
    report = assert_same(run, "llama-2-7b", "1xa100-80gb", deployment,
                         {"num_requests": 60, "input_tokens": {"value": 256}, "output_tokens": {"value": 256}})
    assert report.preemptions > 0


@pytest.mark.parametrize("deployment, cluster", [
    ({"dp": 2, "prefill": {"tp": 1, "pp": 1}}, "2xa100-80gb"),
    ({"prefill": {"tp": 1, "pp": 2}}, "2xa100-80gb"),
    ({"prefill": {"tp": 2, "pp": 2}, "scheduler": "sarathi"}, "4xa100-80gb"),
])
def test_parallel_replicas_under_poisson_arrivals(run, deployment, cluster):
    assert_same(run, "llama-2-7b", cluster, deployment,
                {"num_requests": 120, "preset": "sharegpt-like", "arrival": {"kind": "poisson", "rate_per_s": 8.0}})


@pytest.mark.parametrize("policy", ["fixed", "adaptive", "goodput"])
def test_speculative_runs_draw_the_same_acceptances(run, policy):
    dep = {"speculation": {"draft": "llama-68m", "policy": policy, "k": 4, "acceptance": {"mean": 0.7}},
           "gpu_memory_utilization": 0.3}
    report = assert_same(run, "llama-2-7b", "1xa100-80gb", dep,
                         {"num_requests": 80, "input_tokens": {"value": 256}, "output_tokens": {"value": 300},
                          "arrival": {"kind": "poisson", "rate_per_s": 4.0}})
    assert report.speculation["decode_steps"] > 0


SEESAW = {"prefill": {"tp": 1, "pp": 2}, "decode": {"tp": 2, "pp": 1}, "scheduler": "seesaw"}


@pytest.mark.parametrize("deployment, cluster, workload", [
    # the decode KV outgrows the GPU pool: the newest sequences go back to the CPU buffer
    ({**SEESAW, "cpu_kv_buffer_GB": 8, "gpu_memory_utilization": 0.12}, "2xa100-80gb",
     {"num_requests": 60, "input_tokens": {"value": 256}, "output_tokens": {"value": 1024}}),
    # two replicas behind the router, requests arriving during decode phases
    ({**SEESAW, "dp": 2, "cpu_kv_buffer_GB": 2}, "4xa100-80gb",
     {"num_requests": 120, "preset": "sharegpt-like", "arrival": {"kind": "poisson", "rate_per_s": 8.0}}),
    # a pipeline-parallel decode layout, prefetched KV copies arriving while others decode
    ({**SEESAW, "decode": {"tp": 1, "pp": 2}, "cpu_kv_buffer_GB": 4}, "2xa100-80gb",
     {"num_requests": 100, "preset": "sharegpt-like"}),
])
def test_seesaw_decode_phase_fast_forwards_to_the_step_by_step_results(run, monkeypatch, deployment, cluster, workload):
    copies = []
    real_copy = seesaw.SeesawReplica._copy
    monkeypatch.setattr(seesaw.SeesawReplica, "_copy",
                        lambda self, tokens, layout, name: copies.append((layout, name)) or real_copy(self, tokens, layout, name))
    report = assert_same(run, "llama-2-7b", cluster, deployment, workload)
    assert report.transitions > 0 and report.steps["decode"] > 0
    if deployment.get("gpu_memory_utilization"):
        assert ("decode", "kv to cpu") in copies  # the case does overflow the pool


def test_a_seesaw_decode_phase_is_one_event(run, monkeypatch):
    """One request: its decode phase is one event (step by step, one per step), every step
    still counted."""
    monkeypatch.setattr(simulate, "PROGRESS_EVENTS", 1)  # a progress call after every simpy event
    calls = {False: [], True: []}
    for exact in (False, True):
        report, _ = run("llama-2-7b", "2xa100-80gb", {**SEESAW, "cpu_kv_buffer_GB": 4},
                        {"num_requests": 1, "input_tokens": {"value": 100}, "output_tokens": {"value": 500}},
                        exact_steps=exact, progress=lambda *a, seen=calls[exact]: seen.append(a))
        assert report.steps == {"prefill": 1, "decode": 499}
        assert len(report.kv_timeline) == 500
    assert len(calls[True]) - len(calls[False]) == 498


def test_a_lone_request_decodes_in_one_run(run):
    """Nothing happens between its first and last token: one event, every step counted."""
    report, _ = run("llama-2-7b", "1xa100-80gb", "vllm-tp1",
                    {"num_requests": 1, "input_tokens": {"value": 100}, "output_tokens": {"value": 500}})
    assert report.steps == {"prefill": 1, "decode": 499}
    assert len(report.kv_timeline) == 500


def test_the_trace_is_the_same(tmp_path):
    paths = [tmp_path / "fast.json", tmp_path / "exact.json"]
    workload = {"num_requests": 30, "preset": "sharegpt-like", "arrival": {"kind": "poisson", "rate_per_s": 5}}
    for path, exact in zip(paths, (False, True)):
        simulate_serving("llama-2-7b", "2xa100-80gb", {"dp": 2, "preemption": "swap", "cpu_kv_buffer_GB": 4}, workload,
                         trace_path=path, exact_steps=exact)
    fast, exact = (json.loads(p.read_text())["traceEvents"] for p in paths)
    assert len(fast) == len(exact)
    for f, e in zip(fast, exact):
        assert {k: v for k, v in f.items() if k not in ("ts", "dur")} == {k: v for k, v in e.items() if k not in ("ts", "dur")}
        assert math.isclose(f.get("ts", 0), e.get("ts", 0), rel_tol=1e-9)


def test_progress_is_called_with_simulated_time_and_requests_done():
    calls = []
    simulate_serving("llama-2-7b", "1xa100-80gb", "vllm-tp1", {"num_requests": 50, "preset": "sharegpt-like"},
                     progress=lambda *a: calls.append(a))
    assert calls[-1][1:] == (50, 50)
    assert all(b[0] >= a[0] and b[1] >= a[1] for a, b in zip(calls, calls[1:]))


def test_cli_exact_steps_gives_the_same_json_and_progress_never_with_json(tmp_path):
    runner = CliRunner()
    args = ["simulate", "serve", "-m", "llama-2-7b", "-c", "1xa100-80gb", "-d", "vllm-tp1", "-w", "fixed-128-128", "--json"]
    fast, exact = (runner.invoke(app, args + extra) for extra in ([], ["--exact-steps"]))
    assert fast.exit_code == exact.exit_code == 0, fast.stderr + exact.stderr
    assert_close(json.loads(fast.stdout), json.loads(exact.stdout))
    assert fast.stderr == ""  # no progress with --json


@pytest.mark.parametrize("model, cluster, tp, pp, engine", [
    ("llama-2-70b", "4xa100-80gb", 4, 1, None),
    ("llama-2-7b", "2xa100-80gb", 1, 2, "vllm-0.2-ray"),
    ("llama-3-8b", "4xa100-80gb", 2, 2, None),
])
def test_decode_step_time_on_python_numbers_has_the_bits_of_the_array_model(model, cluster, tp, pp, engine):
    """`decode_step_s` (fast-forward's short runs, Seesaw's decode runs) repeats
    `batch_step_s`'s operations; any difference in order would show in the last bits."""
    spec = DeploymentSpec.parse({"engine": engine}).engine if engine else None
    it = IterationModel(load_model(model), load_cluster(cluster), Parallel(tp=tp, pp=pp), spec)
    rng = np.random.default_rng(0)
    for _ in range(500):
        new_tokens = int(rng.integers(1, 6))
        groups = [(int(rng.integers(1, 300)), int(rng.integers(1, 10**6))) for _ in range(int(rng.integers(1, pp + 1)))]
        sums = [BatchSums.decode(n, c, new_tokens, new_tokens) for n, c in groups]
        assert it.decode_step_s(groups, new_tokens) == float(it.batch_step_s(sums))
