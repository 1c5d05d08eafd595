"""Plots and tables of the training tuner's work: one stage's option space, plans side by
side, search time.

Helpers for notebooks and reports; each plot draws on a given matplotlib axis (or makes one)
and returns it. They compute nothing the tuner does not already expose: `evaluator_for`
rebuilds the tuner's view of a chosen plan's layout so that its stage tables can be drawn.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from simulator.specs.catalog import load_cluster, load_model
from simulator.specs.plan import StagePlan, TrainingPlan
from tuner.training.intra_stage import StageTable, frontier
from tuner.training.layout_eval import Counters, LayoutEvaluator
from tuner.training.search import Tuned
from tuner.training.space import Layout

GiB = 2**30


def evaluator_for(model: Any, cluster: Any, plan: TrainingPlan) -> LayoutEvaluator:
    """The tuner's evaluator for the layout (degrees, micro-batch, schedule) of `plan`."""
    model, cluster = load_model(model), load_cluster(cluster)
    layout = Layout(plan.tp, plan.pp, plan.dp, plan.micro_batch_size, plan.virtual_stages,
                    plan.num_microbatches, plan.sequence_parallel, plan.recompute == "selective")
    return LayoutEvaluator(model, cluster, layout, plan.seq(model), Counters())


def option_row(table: StageTable, stage: StagePlan) -> int | None:
    """The row of `table` holding a stage plan's options (ZeRO, offload, checkpointed layers)."""
    off = stage.offload
    want = {"zero": stage.zero_stage or 0, "k": stage.checkpointed_layers or 0,
            "o_w": off.weights if off else 0.0, "o_g": off.gradients if off else 0.0,
            "o_o": off.optimizer if off else 0.0, "o_a": off.activations if off else 0.0}
    match = np.ones(len(table), dtype=bool)
    for key, value in want.items():
        match &= np.isclose(table.options[key], value)
    rows = np.flatnonzero(match)
    return int(rows[0]) if len(rows) else None


def comparison_table(results: Mapping[str, Tuned | None], time_unit: str = "s", memory_unit: str = "GiB"):
    """One row per plan: simulated and closed-form iteration time, the ratio of its time to the
    first plan's, MFU, peak memory and the plan's knobs (per stage, '/'-separated). None (no
    fitting plan) gives a row saying so. Units: time 's' or 'ms', memory 'GiB' or 'MiB'."""
    import pandas as pd

    t_scale, m_scale = {"s": 1.0, "ms": 1e3}[time_unit], {"GiB": 1 / GiB, "MiB": 1 / 2**20}[memory_unit]
    first = next(t for t in results.values() if t is not None).report.iteration_time_s
    rows = {}
    for name, tuned in results.items():
        if tuned is None:
            rows[name] = {"plan": "no plan fits"}
            continue
        plan, rep = tuned.plan, tuned.report
        stages = plan.stages or []
        offload = ["{:g},{:g},{:g},{:g}".format(*s.offload.model_dump().values()) if s.offload and s.offload.any
                   else "-" for s in stages]
        rows[name] = {
            f"iteration ({time_unit})": rep.iteration_time_s * t_scale,
            f"closed form ({time_unit})": tuned.analytic_time_s * t_scale,
            "time / first plan's": rep.iteration_time_s / first, "MFU": rep.mfu,
            f"peak memory ({memory_unit})": rep.peak_memory_bytes * m_scale,
            "tp/pp/dp": f"{plan.tp}/{plan.pp}/{plan.dp}", "mbs": plan.micro_batch_size,
            "v": plan.virtual_stages, "recompute": plan.recompute,
            "layers": "/".join(str(s.layers) for s in stages),
            "checkpointed": "/".join(str(s.checkpointed_layers) for s in stages),
            "ZeRO": "/".join(str(s.zero_stage) for s in stages),
            "offload w,g,o,a": "none" if set(offload) == {"-"} else " / ".join(offload),
        }
    return pd.DataFrame(rows).T


def plot_stage_frontier(evaluator: LayoutEvaluator, layers: int, stage: int, ax: Any = None,
                        chosen: StagePlan | None = None) -> Any:
    """Every memory option of one stage candidate as (T, D): options that do not fit in grey,
    options that fit colored by their peak device memory, and the Pareto frontier of the
    fitting ones (what the inter-stage MILP chooses from) as a line. `chosen` (a stage of a
    plan) is marked with a star."""
    import matplotlib.pyplot as plt

    ax = ax or plt.subplots(figsize=(6.5, 4))[1]
    table = evaluator.table(layers, stage)
    inflight = evaluator.inflight(stage)
    fits = table.fits(inflight, evaluator.capacity, evaluator.host_capacity)
    T_ms, D_ms, mem_GiB = table.T * 1e3, table.D * 1e3, table.memory(inflight) / GiB
    ax.scatter(T_ms[~fits], D_ms[~fits], s=8, marker="x", color="0.75", lw=0.8,
               label=f"does not fit ({int((~fits).sum())})")
    if fits.any():
        points = ax.scatter(T_ms[fits], D_ms[fits], s=12, c=mem_GiB[fits], cmap="viridis",
                            label=f"fits ({int(fits.sum())})")
        ax.figure.colorbar(points, ax=ax, label="peak memory (GiB)")
        front = frontier(table, fits, None)
        ax.plot(T_ms[front], D_ms[front], "o-", color="crimson", ms=5, mfc="none", lw=1.2,
                label=f"Pareto frontier ({len(front)})")
    row = option_row(table, chosen) if chosen is not None else None
    if row is not None:
        ax.scatter([T_ms[row]], [D_ms[row]], s=160, marker="*", color="orange", edgecolor="k",
                   zorder=5, label="chosen")
    ax.set(xlabel="T: time per micro-batch (ms)", ylabel="D: extra time at the batch boundary (ms)",
           title=f"stage {stage} with {layers} layers, {inflight:g} micro-batches in flight, "
                 f"{evaluator.capacity / GiB:.3g} GiB")
    ax.legend(fontsize=8)
    return ax


def plot_plan_comparison(results: Mapping[str, Tuned | None], axes: Any = None) -> Any:
    """Per-stage busy time and per-stage peak memory of each plan (bars side by side), with
    the device memory as a dashed line. Plans that are None (no fitting plan) are skipped."""
    import matplotlib.pyplot as plt

    plans = {name: t for name, t in results.items() if t is not None}
    if axes is None:
        axes = plt.subplots(1, 2, figsize=(13, 3.8))[1]
    ax_t, ax_m = axes
    stages = max((len(t.report.stages) for t in plans.values()), default=0)
    width = 0.8 / max(len(plans), 1)
    for n, (name, tuned) in enumerate(plans.items()):
        rep = tuned.report
        x = np.array([s.stage for s in rep.stages]) + (n - (len(plans) - 1) / 2) * width
        label = f"{name}: {rep.iteration_time_s:.2f} s/iter"
        ax_t.bar(x, [s.busy_s for s in rep.stages], width, label=label)
        ax_m.bar(x, [s.memory_bytes / GiB for s in rep.stages], width, label=name)
    if plans:
        device_GiB = next(iter(plans.values())).report.device_memory_bytes / GiB
        ax_m.axhline(device_GiB, color="k", ls="--", lw=1, label="device memory")
    for ax, ylabel in ((ax_t, "busy time per iteration (s)"), (ax_m, "peak memory (GiB)")):
        ax.set_xticks(range(stages))
        ax.set(xlabel="pipeline stage", ylabel=ylabel)
        ax.legend(fontsize=8, ncol=4, loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False)
    return axes


def plot_tuning_time(rows: Iterable[Mapping[str, Any]], ax: Any = None) -> Any:
    """Tuning seconds vs number of GPUs. Each row has 'gpus' and 'seconds' (and optionally
    'evaluations', annotated beside its point)."""
    import matplotlib.pyplot as plt

    ax = ax or plt.subplots(figsize=(6, 3.6))[1]
    rows = sorted(rows, key=lambda r: r["gpus"])
    gpus = [r["gpus"] for r in rows]
    ax.plot(gpus, [r["seconds"] for r in rows], "o-")
    for r in rows:
        if "evaluations" in r:
            ax.annotate(f"{r['evaluations'] / 1e6:.1f}M evals", (r["gpus"], r["seconds"]),
                        textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xscale("log", base=2)
    ax.set_xticks(gpus, [str(g) for g in gpus])
    ax.set(xlabel="GPUs", ylabel="tuning time (s)", ylim=(0, None))
    ax.grid(alpha=0.3)
    return ax
