"""simulate_serving: a deployment serving a workload -> ServingReport.

Specs (model, cluster, deployment, workload) -> checks and KV capacity per layout ->
requests -> a simpy run of DP replicas behind a router (join the replica with the fewest
outstanding requests) -> report. Static deployments run the vllm or sarathi scheduler in
`batch_scheduler.BatchReplica`, which fast-forwards through runs of identical decode steps
(`batch.py`), or with `exact_steps=True` in `replica.Replica`, one event per engine step, with
the same results; re-sharding deployments run `seesaw.SeesawReplica`, whose decode phase
fast-forwards the same way (step by step with `exact_steps=True`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import simpy

from simulator.engine.trace import write_chrome_trace
from simulator.errors import SpecError
from simulator.serving.batch import ServingEnvironment
from simulator.serving.batch_scheduler import BatchReplica, BatchScheduler
from simulator.serving.iteration import IterationModel
from simulator.serving.kv_cache import BlockManager
from simulator.serving.recorder import Recorder
from simulator.serving.replica import Replica
from simulator.serving.report import ServingReport, build_report
from simulator.serving.router import least_outstanding
from simulator.serving.schedulers import StaticScheduler
from simulator.serving.seesaw import SeesawReplica
from simulator.serving.sequence import Seq
from simulator.serving.workload import Request, generate_requests
from simulator.specs.catalog import load_cluster, load_deployment, load_model, load_workload
from simulator.specs.hardware import GB, ClusterSpec, GiB
from simulator.specs.model import TransformerSpec
from simulator.specs.serving import DeploymentSpec, Parallel, validate_deployment
from simulator.speculation import (
    NGRAM,
    ModelStepCost,
    Speculator,
    acceptance_rate,
    draft_model_of,
    sample_rates,
)

Progress = Callable[[float, int, int], None]  # (simulated seconds, requests done, requests)
PROGRESS_EVENTS = 2000  # simpy events between two progress calls


def kv_capacity_tokens(model: TransformerSpec, cluster: ClusterSpec, dep: DeploymentSpec,
                       it: IterationModel, field: str) -> int:
    """Tokens of KV one replica holds in this layout, after weights and activation workspace.

    With a draft model, the device that runs it (rank 0 of the replica) also holds the
    draft's weight shard and its KV per token; every device gets that device's capacity.
    """
    m, t = model, it.layout.tp
    workspace = 2.0 * dep.max_batched_tokens * (6 * m.hidden_size + 3 * m.ffn_hidden_size / t)
    workspace += 4.0 * dep.max_num_seqs * m.vocab_size / t  # fp32 logits
    weights, kv_per_token = it.weight_bytes_per_device(), it.kv_bytes_per_token_per_device()
    spec = dep.speculation
    if spec is not None and spec.draft != NGRAM:
        draft = IterationModel(draft_model_of(spec, model, it.layout), cluster, Parallel(tp=spec.draft_tp))
        weights += draft.weight_bytes_per_device()
        kv_per_token += draft.kv_bytes_per_token_per_device()
        k_tokens = dep.max_num_seqs * (spec.k if spec.policy == "fixed" else spec.k_max)
        workspace += 4.0 * k_tokens * m.vocab_size / t  # logits of the verified drafts
    free = cluster.device.memory_bytes * dep.gpu_memory_utilization - weights - workspace
    if free <= 0:
        raise SpecError(field, it.layout.describe(), (
            f"the weights ({weights / GiB:.1f} GiB per device) and workspace do not fit in "
            f"{dep.gpu_memory_utilization:.0%} of {cluster.device.memory_GiB:g} GiB: use more tensor or pipeline parallelism"))
    return int(free // kv_per_token) // dep.block_size * dep.block_size


def check_deployment(model, cluster, dep: DeploymentSpec, requests: list[Request]) -> dict[str, int]:
    validate_deployment(dep, model, cluster)
    longest = max(r.input_tokens + r.output_tokens for r in requests)
    longest_prompt = max(r.input_tokens for r in requests)
    caps = {}
    for phase in ("prefill", "decode"):
        layout = getattr(dep, phase)
        caps[phase] = kv_capacity_tokens(model, cluster, dep, IterationModel(model, cluster, layout, dep.engine), f"deployment.{phase}")
        if caps[phase] < longest:
            raise SpecError(f"deployment.{phase}", layout.describe(), (
                f"memory too small for one sequence: KV for {caps[phase]:,} tokens fits per replica, "
                f"the longest request needs {longest:,}"))
    if dep.scheduler == "vllm" and longest_prompt > dep.max_batched_tokens:
        raise SpecError("deployment.max_batched_tokens", dep.max_batched_tokens,
                        f"must be >= the longest prompt ({longest_prompt:,} tokens) without chunked prefill; "
                        "raise it or use scheduler: sarathi")
    if dep.scheduler == "seesaw" and cpu_buffer_tokens(model, dep) < longest_prompt:
        # a prompt that never fits the buffer would stall the prefill phase forever
        raise SpecError("deployment.cpu_kv_buffer_GB", dep.cpu_kv_buffer_GB, (
            f"must hold the KV of the longest prompt ({longest_prompt:,} tokens = "
            f"{longest_prompt * _kv_bytes_per_token(model) / GB:.2f} GB)"))
    return caps


def _kv_bytes_per_token(model: TransformerSpec) -> float:
    return 4.0 * model.head_dim * model.num_kv_heads * model.num_layers  # whole model, 16-bit


def cpu_buffer_tokens(model: TransformerSpec, dep: DeploymentSpec) -> int:
    """Tokens of KV the seesaw CPU buffer of one replica holds."""
    return int(dep.cpu_kv_buffer_GB * GB // _kv_bytes_per_token(model))


def _speculator(model, cluster, dep: DeploymentSpec, requests: list[Request], seed: int) -> Speculator | None:
    spec = dep.speculation
    if spec is None:
        return None
    cost = ModelStepCost.build(model, cluster, dep.decode, spec, dep.engine)
    context = sum(r.input_tokens + r.output_tokens / 2 for r in requests) / len(requests)
    return Speculator(spec, cost, context, np.random.default_rng(seed), dep.max_num_seqs)


def _replicas(env, model, cluster, dep, caps, rec, requests, seed, next_arrival_s):
    prefill = IterationModel(model, cluster, dep.prefill, dep.engine)
    if dep.scheduler == "seesaw":
        decode = IterationModel(model, cluster, dep.decode, dep.engine)
        buffer_tokens = cpu_buffer_tokens(model, dep)
        return [SeesawReplica(env, i, dep, prefill, decode, caps, buffer_tokens, cluster, rec, next_arrival_s)
                for i in range(dep.dp)]
    out = []
    for i in range(dep.dp):
        cpu_blocks = int(dep.cpu_kv_buffer_GB * GB // (prefill.kv_bytes_per_token_per_device() * dep.block_size))
        kv = BlockManager(caps["prefill"] // dep.block_size, dep.block_size, cpu_blocks,
                          prefix_caching=dep.prefix_caching)
        speculator = _speculator(model, cluster, dep, requests, seed + 1 + i)
        if next_arrival_s is None:
            replica = Replica(env, i, StaticScheduler(dep, kv, speculator), prefill, rec, cluster.host_link_bytes_per_s())
        else:
            replica = BatchReplica(env, i, BatchScheduler(dep, kv, speculator), prefill, rec,
                                   cluster.host_link_bytes_per_s(), next_arrival_s)
        out.append(replica)
    return out


class Arrivals:
    """The request stream: hands each request to the replica with the fewest outstanding at
    its arrival time (`router.least_outstanding`), and says when the next one arrives
    (fast-forward stops before it)."""

    def __init__(self, env: simpy.Environment, seqs: list[Seq]):
        self.env, self.seqs, self.replicas = env, seqs, []
        self.submitted = 0
        self.next_s = 0.0

    def run(self):
        env = self.env
        for seq in self.seqs:
            if seq.req.arrival_s > env.now:
                delay = seq.req.arrival_s - env.now
                self.next_s = env.now + delay  # the time simpy schedules the timeout at
                yield env.timeout(delay)
            self.replicas[least_outstanding([r.outstanding for r in self.replicas])].submit(seq)
            self.submitted += 1
        self.next_s = math.inf

    def done(self) -> int:
        """Requests finished so far."""
        return self.submitted - sum(r.outstanding for r in self.replicas)


def _run(env: simpy.Environment, arrivals: Arrivals, progress: Progress | None) -> None:
    """Run the simulation to its end, calling `progress(simulated_s, done, total)` every
    PROGRESS_EVENTS events and at the end."""
    if progress is None:
        env.run()
        return
    total, n = len(arrivals.seqs), 0
    while env.peek() != math.inf:
        env.step()
        n += 1
        if n % PROGRESS_EVENTS == 0:
            progress(env.now, arrivals.done(), total)
    progress(env.now, arrivals.done(), total)


def simulate_serving(model: Any, cluster: Any, deployment: Any, workload: Any,
                     trace_path: str | Path | None = None, exact_steps: bool = False,
                     progress: Progress | None = None) -> ServingReport:
    """Serve `workload` with `deployment`. Each argument: spec, catalog name, path or mapping.

    Static deployments fast-forward through runs of identical decode steps
    (`batch_scheduler.py`); `exact_steps=True` runs every engine step as its own event
    instead, with the same results. `progress(simulated_s, requests_done, requests)` is
    called now and then while the simulation runs.
    """
    model, cluster = load_model(model), load_cluster(cluster)
    dep, wl = load_deployment(deployment), load_workload(workload)
    requests = generate_requests(wl)
    caps = check_deployment(model, cluster, dep, requests)
    env, rec = ServingEnvironment(), Recorder(trace=trace_path is not None)
    seqs = [Seq(r) for r in requests]
    arrivals = Arrivals(env, seqs)
    replicas = _replicas(env, model, cluster, dep, caps, rec, requests, wl.seed,
                         None if exact_steps else (lambda: arrivals.next_s))
    arrivals.replicas = replicas
    if dep.speculation is not None:  # each request's acceptance rate, drawn once
        rates = sample_rates(dep.speculation.acceptance, len(seqs), np.random.default_rng(wl.seed))
        for seq, rate in zip(seqs, rates):
            seq.acceptance = float(rate)

    env.process(arrivals.run())
    _run(env, arrivals, progress)
    unfinished = [s.id for s in seqs if s.finish_s is None]
    if unfinished:  # a scheduler bug: every request must complete
        raise RuntimeError(f"{len(unfinished)} requests never finished (first: {unfinished[:5]})")
    stats = rec.stats()
    static = [r for r in replicas if not isinstance(r, SeesawReplica)]
    stats["preemptions"] = sum(r.sched.preemptions for r in static)
    if dep.prefix_caching:
        stats["prefix_cache"] = {"cached_prompt_tokens": sum(r.sched.cached_tokens for r in static),
                                 "prompt_tokens": sum(s.req.input_tokens for s in seqs),
                                 "evictions": sum(r.sched.kv.evictions for r in static)}
    if dep.speculation is not None:
        stats["speculation"] = _merge_speculation([r.sched.speculator.stats() for r in replicas])
    if trace_path is not None:
        write_chrome_trace(rec.trace_events(), trace_path, f"{model.name} on {cluster.name}", process_label="replica")
    return build_report(model, cluster, dep, wl, seqs, stats)


def _merge_speculation(per_replica: list[dict]) -> dict:
    """One summary of the speculators of every replica."""
    out = dict(per_replica[0])
    hist: dict[int, int] = {}
    for st in per_replica:
        for k, n in st["k_histogram"].items():
            hist[k] = hist.get(k, 0) + n
    steps = sum(hist.values())
    totals = {key: sum(st[key] for st in per_replica) for key in ("drafted", "accepted", "rejections")}
    out.update(decode_steps=steps, k_histogram=dict(sorted(hist.items())),
               mean_k=sum(k * n for k, n in hist.items()) / max(steps, 1), **totals,
               acceptance_rate=acceptance_rate(totals["accepted"], totals["rejections"]))
    return out
