"""ServingReport: throughput, latency percentiles, transitions and KV utilization of a run."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from simulator.serving.sequence import Seq


def percentiles(values) -> dict[str, float]:
    v = np.asarray(values, dtype=float)
    if v.size == 0:
        return {"p50": float("nan"), "p90": float("nan"), "p99": float("nan"), "mean": float("nan")}
    p50, p90, p99 = np.percentile(v, [50, 90, 99])
    return {"p50": float(p50), "p90": float(p90), "p99": float(p99), "mean": float(v.mean())}


@dataclass
class ServingReport:
    model: str
    cluster: str
    num_requests: int
    makespan_s: float
    output_tokens_per_s: float
    total_tokens_per_s: float
    requests_per_s: float
    ttft_s: dict[str, float]
    tpot_s: dict[str, float]
    latency_s: dict[str, float]
    preemptions: int
    transitions: int
    transition_time_s: float
    kv_utilization: dict[str, float]          # mean and max of the GPU KV pool, over time
    steps: dict[str, int]                     # engine steps by kind
    deployment: dict[str, Any] = field(default_factory=dict)
    workload: dict[str, Any] = field(default_factory=dict)
    kv_timeline: list[tuple[float, float]] = field(default_factory=list, repr=False)
    per_request: dict[str, list[float]] = field(default_factory=dict, repr=False)
    speculation: dict[str, Any] | None = None  # policy, k per step, acceptance (speculative decoding)
    prefix_cache: dict[str, int] | None = None  # prompt tokens taken from the cache, of all; evictions
    cost_sources: dict[str, str] = field(default_factory=dict)  # cost -> datasheet | measured <date> (<profile>)

    def to_dict(self, timelines: bool = False) -> dict[str, Any]:
        out = asdict(self)
        if not timelines:
            out.pop("kv_timeline")
            out.pop("per_request")
        return out

    def plot_latency_cdf(self, ax=None, label: str | None = None):
        """CDFs of TTFT and TPOT (two axes)."""
        import matplotlib.pyplot as plt

        axes = ax if ax is not None else plt.subplots(1, 2, figsize=(9, 3))[1]
        for a, key, name in zip(axes, ("ttft_s", "tpot_s"), ("TTFT (s)", "TPOT (s)")):
            v = np.sort(np.asarray(self.per_request.get(key, []), dtype=float))
            a.plot(v, np.arange(1, v.size + 1) / max(v.size, 1), label=label)
            a.set_xlabel(name)
            a.set_ylabel("fraction of requests")
        return axes

    def plot_kv_utilization(self, ax=None, label: str | None = None):
        import matplotlib.pyplot as plt

        ax = ax or plt.subplots(figsize=(8, 2.5))[1]
        if self.kv_timeline:
            t, u = zip(*self.kv_timeline)
            ax.step(t, u, where="post", label=label)
        ax.set_xlabel("time (s)")
        ax.set_ylabel("GPU KV blocks used")
        ax.set_ylim(0, 1.05)
        return ax


def build_report(model, cluster, deployment, workload, seqs: list[Seq], stats: dict) -> ServingReport:
    done = [s for s in seqs if s.finish_s is not None]
    start = min(s.req.arrival_s for s in seqs)
    makespan = max(s.finish_s for s in done) - start
    out_tokens = sum(s.req.output_tokens for s in done)
    in_tokens = sum(s.req.input_tokens for s in done)
    ttft = [s.first_token_s - s.req.arrival_s for s in done]
    tpot = [(s.finish_s - s.first_token_s) / (s.req.output_tokens - 1) for s in done if s.req.output_tokens > 1]
    latency = [s.finish_s - s.req.arrival_s for s in done]
    util = stats["kv_timeline"]
    times = np.array([t for t, _ in util] + [start + makespan])
    values = np.array([u for _, u in util])
    mean_util = float(np.sum(values * np.diff(times)) / max(times[-1] - times[0], 1e-12)) if len(values) else 0.0
    return ServingReport(
        model=model.name, cluster=cluster.name, num_requests=len(done), makespan_s=makespan,
        output_tokens_per_s=out_tokens / makespan, total_tokens_per_s=(in_tokens + out_tokens) / makespan,
        requests_per_s=len(done) / makespan, ttft_s=percentiles(ttft), tpot_s=percentiles(tpot),
        latency_s=percentiles(latency), preemptions=stats["preemptions"], transitions=stats["transitions"],
        transition_time_s=stats["transition_time_s"],
        kv_utilization={"mean": mean_util, "max": float(values.max()) if len(values) else 0.0},
        steps=stats["steps"], deployment=deployment.to_dict(), workload=workload.to_dict(),
        kv_timeline=util, per_request={"ttft_s": ttft, "tpot_s": tpot, "latency_s": latency},
        speculation=stats.get("speculation"), prefix_cache=stats.get("prefix_cache"),
        cost_sources=cluster.device.sources(),
    )
