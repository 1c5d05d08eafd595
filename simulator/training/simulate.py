"""simulate_training: one iteration of a training plan -> TrainingReport.

Three inputs (model, cluster, plan) -> per-op costs (`costs.py`) -> the discrete-event
pipeline engine -> a report whose breakdown sums to the iteration time of the slowest stage.
The engine runs twice: as planned, and with free point-to-point transfers, so that the idle
time of the slowest stage splits into the pipeline bubble and exposed PP communication.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from simulator.engine.pipeline import simulate_pipeline
from simulator.engine.pipeline_api import PipelineConfig, TraceEvent
from simulator.engine.trace import write_chrome_trace
from simulator.specs.catalog import load_cluster, load_model, load_plan
from simulator.specs.plan import validate_plan
from simulator.training.costs import TrainingCostModel
from simulator.training.report import StageReport, TrainingReport

GiB = 2**30


def prepare_iteration(model: Any, cluster: Any, plan: Any):
    """Load and cross-check the specs, and build the engine's inputs for one iteration.

    Returns (model, cluster, plan, costs, stages, config); shared by `simulate_training` and
    `training_timeline` so both run exactly the same wiring.
    """
    model, cluster, plan = load_model(model), load_cluster(cluster), load_plan(plan)
    validate_plan(plan, model, cluster)
    costs = TrainingCostModel(model, plan, cluster)
    config = PipelineConfig(
        schedule=plan.schedule, num_stages=plan.pp, num_microbatches=plan.num_microbatches,
        virtual_stages=plan.virtual_stages, p2p_s=costs.p2p_s(),
        overlap_grad_reduce=plan.overlap_grad_reduce,
    )
    return model, cluster, plan, costs, costs.build_stages(), config


def training_timeline(model: Any, cluster: Any, plan: Any) -> list[TraceEvent]:
    """Every forward, backward, transfer and sync of one simulated iteration, as events
    (plot them with `simulator.engine.timeline_plot.plot_timeline`)."""
    *_, stages, config = prepare_iteration(model, cluster, plan)
    return simulate_pipeline(stages, config, record_events=True).events


def simulate_training(model: Any, cluster: Any, plan: Any, trace_path: str | Path | None = None) -> TrainingReport:
    """Predict one iteration. Each argument is a spec, a catalog name, a path, or a mapping."""
    model, cluster, plan, costs, stages, config = prepare_iteration(model, cluster, plan)
    result = simulate_pipeline(stages, config, record_events=trace_path is not None)
    if trace_path is not None:
        write_chrome_trace(result.events, trace_path, process_name=f"{model.name} on {cluster.name}")
    free_p2p = simulate_pipeline(stages, dataclasses.replace(config, p2p_s=0.0), record_events=False)

    crit = max(range(plan.pp), key=lambda i: result.stages[i].end_s)
    tl, tl0 = result.stages[crit], free_p2p.stages[crit]
    busy = sum(tl.busy_parts.values())
    idle = max(0.0, tl.compute_end_s - busy)  # clamp float round-off (pp = 1 has no idle time)
    bubble = min(idle, max(0.0, tl0.compute_end_s - sum(tl0.busy_parts.values())))
    parts = tl.busy_parts
    breakdown = {
        "compute": parts.get("compute", 0.0),
        "recompute": parts.get("recompute", 0.0),
        "tp_comm": parts.get("tp_comm", 0.0),
        "pp_comm": idle - bubble,
        "dp_comm": tl.dp_exposed_s + tl.param_sync_s + parts.get("zero3_comm", 0.0),
        "pipeline_bubble": bubble,
        "offload_stall": parts.get("offload_stall", 0.0),
        "optimizer": tl.optimizer_s,
    }
    iteration = result.iteration_time_s
    assert abs(sum(breakdown.values()) - tl.end_s) < 1e-6 * max(1.0, iteration), (breakdown, tl.end_s)
    return _report(model, cluster, plan, costs, result, breakdown)


def _report(model, cluster, plan, costs: TrainingCostModel, result, breakdown) -> TrainingReport:
    seq = plan.seq(model)
    tokens = plan.global_batch_size * seq
    sel = {"sel": float(plan.recomputes_selectively)}
    one_layer = costs.stage_model.costs(sel, 1.0)
    layer_flops = float(one_layer["layer_flops_fwd"]) * plan.tp
    head_flops = float(one_layer["lm_head_flops_fwd"]) * plan.tp
    per_sample_fwd = model.num_layers * layer_flops + head_flops
    model_flops = 3 * per_sample_fwd * plan.global_batch_size / plan.micro_batch_size
    layers, ckpt = costs.layers, costs.checkpointed
    recompute_fwd = plan.tp * sum(
        float(costs.stage_model.costs({**sel, "k": k}, n)["stage_recompute_flops"]) for n, k in zip(layers, ckpt))
    if plan.recompute == "selective_op":  # every other matmul of the non-checkpointed layers
        share = costs.stage_model.op_recompute_share()
        recompute_fwd += plan.tp * share * float(one_layer["gemm_flops_fwd"]) * sum(n - k for n, k in zip(layers, ckpt))
    hw_flops = model_flops + recompute_fwd * plan.global_batch_size / plan.micro_batch_size
    iteration = result.iteration_time_s
    peak_total = cluster.num_devices * cluster.device.peak_flops * iteration

    reports = []
    for i, tl in enumerate(result.stages):
        mem = costs.stage_memory(i, tl.peak_inflight_bytes)
        reports.append(StageReport(
            stage=i, layers=layers[i], checkpointed_layers=ckpt[i], memory_bytes=mem.total,
            memory=dataclasses.asdict(mem), host_memory_bytes=costs.host_memory(i, tl.peak_inflight_microbatches),
            peak_inflight_microbatches=tl.peak_inflight_microbatches,
            busy_s=sum(tl.busy_parts.values()), end_s=tl.end_s,
        ))
    limit = cluster.device.memory_bytes
    worst = max(reports, key=lambda r: r.memory_bytes)
    reason = None
    if worst.memory_bytes > limit:
        reason = (
            f"stage {worst.stage} needs {worst.memory_bytes / GiB:.1f} GiB but {cluster.device.name} "
            f"has {limit / GiB:.0f} GiB (activations {worst.memory['activations'] / GiB:.1f}, "
            f"optimizer {worst.memory['optimizer'] / GiB:.1f}, weights {worst.memory['weights'] / GiB:.1f}, "
            f"gradients {worst.memory['gradients'] / GiB:.1f} GiB)"
        )
    host = max(reports, key=lambda r: r.host_memory_bytes)
    if reason is None and host.host_memory_bytes > cluster.host_memory_bytes_per_device:
        reason = (
            f"stage {host.stage} offloads {host.host_memory_bytes / GiB:.1f} GiB to host memory but each "
            f"device's share of it is {cluster.host_memory_GiB_per_device:.0f} GiB"
        )
    feasible = reason is None
    return TrainingReport(
        model=model.name, cluster=cluster.name, num_devices=cluster.num_devices,
        iteration_time_s=iteration, tokens_per_s=tokens / iteration,
        mfu=model_flops / peak_total, hfu=hw_flops / peak_total,
        model_flops_per_iteration=model_flops, peak_memory_bytes=worst.memory_bytes,
        device_memory_bytes=limit, feasible=feasible, infeasible_reason=reason,
        breakdown=breakdown, stages=reports, plan=plan.to_dict(), cost_sources=cluster.device.sources(),
        price_per_device_hour=cluster.price_per_device_hour,
    )
