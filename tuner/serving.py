"""Serving tuner: the best static deployment, the best re-sharding one, and their ratio.

1. Enumerate replica layouts: devices per replica dividing the cluster, (tp, pp) with TP
   inside a node and dividing the heads; static deployments under the vllm and sarathi
   schedulers, and re-sharding ones (seesaw) for every pair of different prefill and decode
   layouts of the same replica size, with the CPU memory left after the host copy of the
   weights as KV buffer. On a workload whose prompts share prefixes, static deployments cache
   them (`prefix_caching`, as vLLM and SGLang do by default; Seesaw's two pools do not).
2. Screen every candidate on one sample of the workload: at least `screen_requests`, and
   enough to fill every batch slot of the largest candidate once; candidates that do not
   fit are pruned with the simulator's reason.
3. Re-simulate the best few of each family on the whole workload and keep the fastest.
The static winner is what the best vLLM configuration would be: the baseline.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from simulator.errors import InfeasiblePlan, SpecError
from simulator.serving.iteration import IterationModel
from simulator.serving.report import ServingReport
from simulator.serving.simulate import simulate_serving
from simulator.specs.catalog import load_cluster, load_model, load_workload
from simulator.specs.hardware import GB, ClusterSpec
from simulator.specs.model import TransformerSpec
from simulator.specs.serving import DeploymentSpec, Parallel, WorkloadSpec
from tuner.training.space import tp_allowed

Progress = Callable[[str, int, int], None]


def layouts(model: TransformerSpec, cluster: ClusterSpec, devices: int) -> list[Parallel]:
    out = []
    for tp in range(1, devices + 1):
        if devices % tp or tp > cluster.devices_per_node:
            continue
        pp = devices // tp
        if not tp_allowed(model, tp) or pp > model.num_layers:
            continue
        out.append(Parallel(tp=tp, pp=pp))
    return out


def buffer_GB(model: TransformerSpec, cluster: ClusterSpec, devices: int) -> float:
    """Host memory of a replica left after the host copy of the weights (Seesaw keeps one)."""
    weights = IterationModel(model, cluster, Parallel(tp=1, pp=1)).weight_bytes_per_device()
    host = cluster.host_memory_GiB_per_device * 2**30 * devices
    return max(0.0, 0.9 * (host - weights)) / GB


def candidates(model, cluster, prefix_caching: bool = False) -> list[DeploymentSpec]:
    out = []
    n = cluster.num_devices
    for devices in (d for d in range(1, n + 1) if n % d == 0):
        lays = layouts(model, cluster, devices)
        for lay in lays:
            for scheduler in ("vllm", "sarathi"):
                out.append(DeploymentSpec(dp=n // devices, prefill=lay, scheduler=scheduler, max_batched_tokens=16384,
                                          prefix_caching=prefix_caching))
        buf = buffer_GB(model, cluster, devices)
        if buf <= 0:
            continue
        for pre in lays:
            for dec in lays:
                if pre != dec:
                    out.append(DeploymentSpec(dp=n // devices, prefill=pre, decode=dec, scheduler="seesaw",
                                              cpu_kv_buffer_GB=round(buf, 1), max_batched_tokens=16384))
    return out


@dataclass
class Evaluated:
    deployment: DeploymentSpec
    report: ServingReport

    def to_dict(self) -> dict[str, Any]:
        return {"deployment": self.deployment.to_dict(), "report": self.report.to_dict()}


@dataclass
class ServingTuneResult:
    static: Evaluated | None
    resharding: Evaluated | None
    pruned: list[dict[str, str]] = field(default_factory=list)
    search: dict[str, Any] = field(default_factory=dict)

    @property
    def ratio(self) -> float | None:
        if self.static and self.resharding:
            return self.resharding.report.output_tokens_per_s / self.static.report.output_tokens_per_s
        return None

    @property
    def best(self) -> Evaluated:
        options = [e for e in (self.resharding, self.static) if e is not None]
        return max(options, key=lambda e: e.report.output_tokens_per_s)

    def to_dict(self) -> dict[str, Any]:
        """The tuner contract (DESIGN.md): the winner, the static baseline, the search."""
        return {
            "plan": self.best.deployment.to_dict(), "report": self.best.report.to_dict(),
            "baselines": {"static": self.static and {"plan": self.static.deployment.to_dict(),
                                                     "report": self.static.report.to_dict()}},
            "resharding": self.resharding and {"plan": self.resharding.deployment.to_dict(),
                                               "report": self.resharding.report.to_dict()},
            "resharding_over_static": self.ratio, "pruned": self.pruned, "search": self.search,
        }


def _describe(dep: DeploymentSpec) -> str:
    lay = dep.prefill.describe() if not dep.resharding else f"{dep.prefill.describe()} -> {dep.decode.describe()}"
    return f"dp{dep.dp} {lay} {dep.scheduler}"


def _sample(wl: WorkloadSpec, cands: list[DeploymentSpec], screen_requests: int) -> WorkloadSpec:
    """The workload's first requests, one sample for every candidate (throughputs measured on
    different request counts would not compare), large enough to fill every batch slot of
    the largest candidate once: a sample that drains before large deployments fill up would
    favour small ones."""
    slots = max(d.dp * d.max_num_seqs * max(d.prefill.pp, d.decode.pp) for d in cands)
    return wl.model_copy(update={"num_requests": min(wl.num_requests, max(screen_requests, slots))})


def tune_serving(model: Any, cluster: Any, workload: Any, *, screen_requests: int = 300,
                 finalists: int = 3, progress: Progress | None = None,
                 exact_steps: bool = False) -> ServingTuneResult:
    """The best static and re-sharding deployments; `exact_steps` simulates every engine step
    as its own event (`simulate_serving`'s switch: same results, slower)."""
    model, cluster, wl = load_model(model), load_cluster(cluster), load_workload(workload)
    start = time.perf_counter()
    cands = candidates(model, cluster, prefix_caching=wl.shared_prefix is not None)
    sample = _sample(wl, cands, screen_requests)
    screened, pruned = [], []
    for n, dep in enumerate(cands):
        try:
            screened.append((simulate_serving(model, cluster, dep, sample, exact_steps=exact_steps).output_tokens_per_s, dep))
        except (SpecError, InfeasiblePlan) as err:
            pruned.append({"deployment": _describe(dep), "reason": str(err)})
        if progress:
            progress("screening deployments", n + 1, len(cands))
    screened.sort(key=lambda x: -x[0])
    families = {"static": [d for _, d in screened if not d.resharding],
                "resharding": [d for _, d in screened if d.resharding]}
    best: dict[str, Evaluated | None] = {}
    for family, deps in families.items():
        runs = [Evaluated(d, simulate_serving(model, cluster, d, wl, exact_steps=exact_steps)) for d in deps[:finalists]]
        best[family] = max(runs, key=lambda e: e.report.output_tokens_per_s, default=None)
        if progress:
            progress(f"re-simulating {family}", 1, 1)
    if best["static"] is None and best["resharding"] is None:
        reasons = "; ".join(f"{p['deployment']}: {p['reason']}" for p in pruned[:3])
        raise InfeasiblePlan(f"no deployment of {model.name} fits on {cluster.name}: {reasons}")
    seconds = time.perf_counter() - start
    search = {"evaluated": len(cands), "feasible": len(screened), "infeasible": len(pruned),
              "seconds": seconds, "evaluations_per_s": len(cands) / max(seconds, 1e-9),
              "screen_requests": sample.num_requests}
    return ServingTuneResult(best["static"], best["resharding"], pruned, search)
