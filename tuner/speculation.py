"""Speculation tuner: the table k*(batch size), and each policy's throughput and latency.

1. Step costs: the symbolic serving model of the target (its deployment layout and engine)
   and of the draft on the cluster's device, or steps measured on a real machine: a profile
   directory written by `simtune profile` (its decode table) or a speculative benchmark's
   JSON, both read by `simulator.speculation.measured_step_cost`. Acceptance rates come from
   the benchmark JSON unless given; a profile directory holds none.
2. The policy table: for every batch size, the k in 0..k_max with the highest expected
   committed tokens per second (`simulator.speculation.policy_table`), its speedup over no
   speculation and over the best single k for every batch size.
3. With a workload, the serving simulator runs it four times on the same deployment: no
   speculation, the best fixed k, the adaptive table, and the per-step goodput policy, with
   per-request stochastic acceptance.
"""

from __future__ import annotations

import csv
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from simulator.errors import SpecError
from simulator.serving.report import ServingReport
from simulator.serving.simulate import simulate_serving
from simulator.specs.catalog import load_cluster, load_engine, load_model, load_workload
from simulator.specs.hardware import ClusterSpec
from simulator.specs.model import TransformerSpec
from simulator.specs.profile import HardwareProfile
from simulator.specs.serving import AcceptanceSpec, DeploymentSpec, Parallel, SpeculationSpec
from simulator.speculation import (
    NGRAM,
    ModelStepCost,
    PolicyTable,
    max_batch_in_kv,
    policy_table,
)
from simulator.speculation.measured import measured_acceptance, measured_step_cost, read_measurement
from tuner.training.space import tp_allowed

DEFAULT_BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
POLICIES = ("none", "fixed", "adaptive", "goodput")
Progress = Callable[[str, int, int], None]


def _rate(value: Any) -> float:
    """A rate as a float; NaN (never in (0, 1)) for text that is no number or one beyond floats."""
    try:
        return float(value)
    except (TypeError, ValueError, OverflowError):
        return math.nan


def read_acceptance_trace(path: str | Path, workload_class: str | None = None) -> AcceptanceSpec:
    """Per-request acceptance rates from a file: a CSV with an `acceptance` column, a JSON
    list, or a speculative benchmark's JSON (`{"acceptance": {"per_request": [...]}}`, or per
    workload class under "classes": `workload_class`, default the first)."""
    path = Path(path)
    if not path.exists():
        raise SpecError("acceptance_trace", str(path), "file does not exist")
    if path.suffix == ".csv":
        try:
            with open(path, newline="", encoding="utf-8") as f:
                rows = list(csv.DictReader(f))
        except (UnicodeDecodeError, csv.Error) as err:
            raise SpecError("acceptance_trace", str(path), f"is not a CSV text file: {err}") from None
        if not rows or "acceptance" not in rows[0]:
            raise SpecError("acceptance_trace", str(path), "a CSV needs an 'acceptance' column")
        values = [r["acceptance"] for r in rows]
    else:
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as err:
            raise SpecError("acceptance_trace", str(path), f"is not JSON (or a .csv file): {err}") from None
        if isinstance(data, dict):
            return measured_acceptance(data, workload_class, str(path))[0]
        if not isinstance(data, list) or not all(isinstance(v, (int, float)) for v in data):
            raise SpecError("acceptance_trace", str(path), "a JSON trace is a list of rates or a benchmark's JSON")
        values = data
    bad = [v for v in values if not 0 < _rate(v) < 1]
    if bad or not values:
        raise SpecError("acceptance_trace", bad[0] if bad else str(path),
                        f"every rate in {path.name} must be in (0, 1), and there must be at least one")
    return AcceptanceSpec(distribution="empirical", values=[float(v) for v in values])


def _tune_measured(measurement: Any, acceptance: AcceptanceSpec | None, batch_sizes: Sequence[int], k_max: int,
                   context: float | None, workload_class: str | None, started: float) -> SpecTuneResult:
    """The policy table from measured step costs (the table's context: the measured one)."""
    where = str(measurement) if isinstance(measurement, (str, Path)) else "measurement"
    source = read_measurement(measurement) if isinstance(measurement, (str, Path)) else measurement
    cost = measured_step_cost(source, context, where=where)
    search: dict[str, Any] = {"source": "measured", "profile": where, "context_measured": cost.context}
    if context is not None:
        search["context_requested"] = context
    if acceptance is not None:
        search["acceptance_from"] = "given"
    elif isinstance(source, HardwareProfile):
        raise SpecError("acceptance", None, (
            f"{where} is a profile directory: it holds step costs, not acceptance rates; give --acceptance RATE "
            "or --acceptance-trace FILE (e.g. benchmarks/results/speculative_serving_cpu.json)"))
    else:
        acceptance, search["acceptance_from"] = measured_acceptance(source, workload_class, where)
    sizes = [b for b in batch_sizes if cost.batch_sizes[0] <= b <= cost.batch_sizes[-1]] or cost.batch_sizes
    k_max = min(k_max, cost.max_tokens_per_seq - 1)
    table = policy_table(cost, acceptance, sizes, k_max, cost.context)
    return SpecTuneResult(table, None, search={"seconds": time.perf_counter() - started, **search})


def smallest_tp(model: TransformerSpec, cluster: ClusterSpec, engine=None) -> int:
    """The fewest GPUs of one node (a divisor of the heads) whose memory holds the weights
    with room for KV: vLLM's usual single-replica layout."""
    from simulator.serving.iteration import IterationModel

    for tp in range(1, cluster.devices_per_node + 1):
        if cluster.devices_per_node % tp or not tp_allowed(model, tp):
            continue
        weights = IterationModel(model, cluster, Parallel(tp=tp), engine).weight_bytes_per_device()
        if weights < 0.6 * cluster.device.memory_bytes:
            return tp
    raise SpecError("target", model.name, f"does not fit on one node of {cluster.name} with room for KV")


@dataclass
class SpecTuneResult:
    table: PolicyTable
    deployment: DeploymentSpec | None            # the target's deployment, speculation adaptive
    runs: dict[str, ServingReport] = field(default_factory=dict)
    search: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out = self.table.to_dict()
        out["deployment"] = self.deployment.to_dict() if self.deployment else None
        base = self.runs.get("none")
        out["workload"] = {
            name: {**_summary(rep), "throughput_over_no_speculation":
                   rep.output_tokens_per_s / base.output_tokens_per_s if base else None}
            for name, rep in self.runs.items()
        } or None
        out["search"] = self.search
        return out


def _summary(rep: ServingReport) -> dict[str, Any]:
    return {"output_tokens_per_s": rep.output_tokens_per_s, "ttft_s": rep.ttft_s, "tpot_s": rep.tpot_s,
            "makespan_s": rep.makespan_s, "speculation": rep.speculation}


def tune_speculation(
    target: Any = None,
    draft: str | None = None,
    cluster: Any = None,
    acceptance: AcceptanceSpec | float | None = None,
    *,
    batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES,
    k_max: int = 8,
    context: float | None = None,
    tp: int | None = None,
    engine: Any = None,
    workload: Any = None,
    measurement: dict[str, Any] | HardwareProfile | str | Path | None = None,
    workload_class: str | None = None,
    progress: Progress | None = None,
) -> SpecTuneResult:
    """k*(b) for a target and draft on a cluster, or from a `measurement`, and with a
    `workload` each policy's simulated throughput and latency.

    A measurement is a profile directory written by `simtune profile` (step costs only:
    `acceptance` is then required) or a speculative benchmark's results (a dict, or its JSON
    file: step costs and per-request acceptance, per workload class for the continuous-
    batching benchmark, `workload_class` choosing one, default the first)."""
    started = time.perf_counter()
    if isinstance(acceptance, (int, float)):
        acceptance = AcceptanceSpec.parse({"mean": float(acceptance)}, prefix="acceptance")
    if measurement is not None:
        if workload is not None:
            raise SpecError("workload", "given", "a measured profile predicts the policy table only; "
                            "give a target, draft and cluster to simulate a workload")
        return _tune_measured(measurement, acceptance, batch_sizes, k_max, context, workload_class, started)

    if target is None or draft is None or cluster is None or acceptance is None:
        missing = [n for n, v in (("target", target), ("draft", draft), ("cluster", cluster),
                                  ("acceptance", acceptance)) if v is None]
        raise SpecError(missing[0], None, "is required (or give a measured profile)")
    model, cluster = load_model(target), load_cluster(cluster)
    engine = load_engine(engine) if engine is not None else None
    wl = load_workload(workload) if workload is not None else None
    tp = tp or smallest_tp(model, cluster, engine)
    if tp > cluster.num_devices:
        raise SpecError("tp", tp, f"must be <= the {cluster.num_devices} devices of {cluster.name}")
    spec = SpeculationSpec.parse({"draft": draft, "policy": "adaptive", "k_max": k_max,
                                  "acceptance": acceptance.to_dict()}, prefix="speculation")
    dep = DeploymentSpec(prefill=Parallel(tp=tp), dp=cluster.num_devices // tp, speculation=spec, engine=engine)
    cost = ModelStepCost.build(model, cluster, dep.decode, spec, engine)
    if context is None:
        context = 512.0
        if wl is not None:
            from simulator.serving.workload import generate_requests

            reqs = generate_requests(wl)
            context = sum(r.input_tokens + r.output_tokens / 2 for r in reqs) / len(reqs)
    limit = max_batch_in_kv(model, cluster, dep, context)
    fitting = [b for b in batch_sizes if b <= limit]
    if not fitting:
        raise SpecError("batch_sizes", list(batch_sizes), (
            f"none fits: the KV cache of {model.name} on tp {tp} holds {limit} sequences of "
            f"{context:,.0f} + {k_max + 1} tokens"))
    table = policy_table(cost, acceptance, fitting, k_max, context)
    result = SpecTuneResult(table, dep)
    if wl is not None:
        deployments = {
            "none": dep.model_copy(update={"speculation": None}),
            "fixed": dep.model_copy(update={"speculation": spec.model_copy(update={"policy": "fixed", "k": table.best_fixed_k})}),
            "adaptive": dep,
            "goodput": dep.model_copy(update={"speculation": spec.model_copy(update={"policy": "goodput"})}),
        }
        for i, (name, d) in enumerate(deployments.items()):
            if progress:
                progress(f"simulating {name}", i, len(deployments))
            result.runs[name] = simulate_serving(model, cluster, DeploymentSpec.parse(d.to_dict()), wl)
        if progress:
            progress("simulating", len(deployments), len(deployments))
    result.search = {"seconds": time.perf_counter() - started, "source": "model", "max_batch_in_kv": limit,
                     "batch_sizes_dropped": [b for b in batch_sizes if b > limit],
                     "evaluated": len(table.rows) * (k_max + 1), "draft_is_model": draft != NGRAM}
    return result
