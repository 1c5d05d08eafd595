"""tune_training: the best plan that fits, over the whole space, in seconds.

1. Enumerate legal layouts (`space.layouts`).
2. Screen each with uniform layers and each stage's fastest fitting option (coarse grid).
3. For the best screened layouts: per stage, the memory-feasible Pareto frontier of every
   layer count in the band (`intra_stage`), then the inter-stage MILP (`inter_stage`).
4. Re-simulate the best MILP solutions with the discrete-event simulator; the fastest wins.
Both predictions (closed form and discrete-event) are reported.

Families (`space.FAMILIES`: FSDP, HSDP, FSDP+TP, 3D). Besides the overall best, the search
refines the best `family_layouts` screened layouts of every family and re-simulates each
family's best MILP solution, so the report can say which family won and by how much over
the best plan of each other family (`TuneResult.families`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from simulator.errors import InfeasiblePlan
from simulator.specs.catalog import load_cluster, load_model
from simulator.specs.plan import TrainingPlan
from simulator.training import TrainingReport, simulate_training
from tuner.training.inter_stage import solve_stages
from tuner.training.layout_eval import Counters, LayoutEvaluator, Screening
from tuner.training.plans import build_plan
from tuner.training.space import FAMILIES, layouts

GiB = 2**30
Progress = Callable[[str, int, int], None]


@dataclass
class SearchStats:
    evaluated: int
    feasible: int
    infeasible: int
    seconds: float
    cost_model_rows: int
    layouts: int
    layouts_feasible: int
    milps: int

    def to_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "evaluations_per_s": self.evaluated / max(self.seconds, 1e-9)}


@dataclass
class Tuned:
    plan: TrainingPlan
    report: TrainingReport
    analytic_time_s: float

    def to_dict(self) -> dict[str, Any]:
        return {"plan": self.plan.to_dict(), "report": self.report.to_dict(),
                "analytic_iteration_time_s": self.analytic_time_s}


@dataclass
class TuneResult:
    best: Tuned
    search: SearchStats
    baselines: dict[str, Tuned | None] = field(default_factory=dict)  # None: nothing in its space fits
    families: dict[str, Tuned | None] = field(default_factory=dict)   # None: nothing in the family fits

    @property
    def winner(self) -> str:
        return next(f for f, t in self.families.items() if t is self.best) if self.families else ""

    def family_dict(self) -> dict[str, Any]:
        """Per family: its best plan and report, and its iteration time over the winner's."""
        best = self.best.report.iteration_time_s
        return {name: t and {**t.to_dict(), "iteration_time_s": t.report.iteration_time_s,
                             "ratio_to_best": t.report.iteration_time_s / best, "won": t is self.best}
                for name, t in self.families.items()}

    def to_dict(self) -> dict[str, Any]:
        return {"plan": self.best.plan.to_dict(), "report": self.best.report.to_dict(),
                "analytic_iteration_time_s": self.best.analytic_time_s,
                "baselines": {k: v and v.to_dict() for k, v in self.baselines.items()},
                "families": self.family_dict(), "search": self.search.to_dict()}


def screen_all(model, cluster, global_batch_size, seq, counters, progress=None, **space) -> list[Screening]:
    found = list(layouts(model, cluster, global_batch_size, **space))
    out = []
    for n, lay in enumerate(found):
        out.append(LayoutEvaluator(model, cluster, lay, seq, counters).screen())
        if progress:
            progress("screening layouts", n + 1, len(found))
    return out


def nothing_fits(model, cluster, screened: list[Screening]) -> InfeasiblePlan:
    """An actionable message naming the smallest memory shortfall."""
    if not screened:
        return InfeasiblePlan(f"no legal layout of {model.name} on {cluster.num_devices} devices "
                              f"(check that the global batch size is divisible by data parallel degrees)")
    close = min(screened, key=lambda s: s.shortfall_bytes)
    device, host = (x / GiB for x in close.need_bytes)
    return InfeasiblePlan(
        f"nothing fits: the closest layout ({close.layout.describe()}, with the best ZeRO, offload "
        f"and recompute options) needs {device:.1f} GiB on its fullest device (the "
        f"{cluster.device.name} has {cluster.device.memory_GiB:.0f} GiB) and {host:.1f} GiB of host "
        f"memory for what it offloads ({cluster.host_memory_GiB_per_device:.0f} GiB per device): "
        f"{close.shortfall_bytes / GiB:.1f} GiB short. It would fit with more GPUs (more pipeline or "
        f"data parallel sharding), a smaller micro-batch or sequence length, or more device or "
        f"host memory."
    )


def tune_training(model: Any, cluster: Any, global_batch_size: int, seq_length: int | None = None, *,
                  top_layouts: int = 6, screen_margin: float = 0.05, max_layouts: int = 32,
                  frontier_points: int = 6, resimulate: int = 3, family_layouts: int = 2,
                  baselines: tuple[str, ...] = ("megatron", "aceso"), progress: Progress | None = None,
                  **space) -> TuneResult:
    """Search the plan space for the fastest plan that fits. Raises InfeasiblePlan if none."""
    from tuner.training.baselines import BASELINES  # late: baselines reuse this module

    model, cluster = load_model(model), load_cluster(cluster)
    seq = seq_length or model.seq_length
    start, counters = time.perf_counter(), Counters()
    screened = screen_all(model, cluster, global_batch_size, seq, counters, progress, **space)
    ok = sorted((s for s in screened if s.time_s is not None), key=lambda s: s.time_s)
    if not ok:
        raise nothing_fits(model, cluster, screened)
    # The MILP refines the best screened layouts: at least `top_layouts`, plus every layout
    # whose uniform-layer screening is within `screen_margin` of the best (uneven layers and
    # per-stage options can overturn small screening differences), at most `max_layouts`.
    cutoff = ok[0].time_s * (1 + screen_margin)
    chosen = [s for n, s in enumerate(ok) if n < top_layouts or s.time_s <= cutoff][:max_layouts]
    for family in FAMILIES:  # and the best few of every family, for the family report
        taken = {id(s) for s in chosen}
        chosen += [s for s in ok if s.layout.family == family and id(s) not in taken][:family_layouts]
    solutions = []
    for n, scr in enumerate(chosen):
        ev = LayoutEvaluator(model, cluster, scr.layout, seq, counters)
        try:
            choice, t = solve_stages(ev.candidates(frontier_points), model.num_layers,
                                     scr.layout.num_microbatches, scr.layout.virtual_stages, ev.p2p_s())
        except InfeasiblePlan:
            continue
        solutions.append((t, [c.ref for c in choice], scr.layout))
        if progress:
            progress("solving inter-stage MILPs", n + 1, len(chosen))
    solutions.sort(key=lambda s: s[0])
    best, families = _resimulate(model, cluster, solutions, resimulate, global_batch_size, seq, progress)
    stats = SearchStats(counters.evaluated, counters.feasible, counters.infeasible,
                        time.perf_counter() - start, counters.cost_rows, len(screened), len(ok), len(solutions))
    result = TuneResult(best, stats, families=families)
    for name in baselines:
        if progress:
            progress(f"baseline {name}", 0, 1)
        result.baselines[name] = BASELINES[name](model, cluster, global_batch_size, seq, screened=screened)
        if progress:
            progress(f"baseline {name}", 1, 1)
    return result


def _resimulate(model, cluster, solutions, top, global_batch_size, seq, progress) -> tuple[Tuned, dict]:
    """Re-simulate the `top` best MILP solutions and the best solution of every family.

    Returns the fastest plan and, per family, its fastest re-simulated plan (None: none fits).
    """
    picked = list(solutions[:top])
    for family in FAMILIES:
        taken = {id(s) for s in picked}
        picked += [s for s in solutions if s[2].family == family and id(s) not in taken][:1]
    families: dict[str, Tuned | None] = dict.fromkeys(FAMILIES)
    for n, (t, rows, layout) in enumerate(picked):
        plan = build_plan(layout, rows, global_batch_size, seq)
        report = simulate_training(model, cluster, plan)
        if report.feasible:
            held = families[layout.family]
            if held is None or report.iteration_time_s < held.report.iteration_time_s:
                families[layout.family] = Tuned(plan, report, t)
        if progress:
            progress("re-simulating the best plans", n + 1, len(picked))
    tuned = [t for t in families.values() if t is not None]
    if not tuned:
        raise InfeasiblePlan("the closed-form memory model and the discrete-event simulator disagree: "
                             "no MILP solution fits when re-simulated")
    return min(tuned, key=lambda x: x.report.iteration_time_s), families
