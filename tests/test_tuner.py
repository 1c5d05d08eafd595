"""Training tuner: optimality against exhaustive search, MILP write-up, frontiers, baselines."""

from __future__ import annotations

import numpy as np
import pytest

from simulator.errors import InfeasiblePlan
from simulator.specs import load_cluster, load_model
from simulator.training import simulate_training
from tuner.training import tune_training
from tuner.training.analytic import pipeline_time_s
from tuner.training.exhaustive import exhaustive_best
from tuner.training.inter_stage import Candidate, solve_stages
from tuner.training.intra_stage import pareto_frontier
from tuner.training.space import inflight_microbatches, layer_band, layouts, option_grid

MiB = 2**20


def small_cluster(memory_mib: float, name: str = "2xa100-80gb"):
    """A debug-sized cluster whose memory makes the tuner's choices matter."""
    base = load_cluster(name)
    return base.model_copy(update={"device": base.device.model_copy(update={"memory_GiB": memory_mib / 1024})})


SIX_LAYERS = load_model("gpt-debug").model_copy(update={"num_layers": 6, "name": "gpt-debug-6"})


@pytest.mark.parametrize("memory_mib", [1.5, 2.0, 3.0, 6.0])
def test_tuner_within_one_percent_of_exhaustive_optimum(memory_mib):
    cluster = small_cluster(memory_mib)
    best, _ = exhaustive_best(SIX_LAYERS, cluster, 16, SIX_LAYERS.seq_length)
    result = tune_training(SIX_LAYERS, cluster, 16, baselines=())
    assert result.best.analytic_time_s <= best * 1.01
    assert result.best.report.feasible


def test_tight_memory_forces_uneven_per_stage_choices():
    result = tune_training(SIX_LAYERS, small_cluster(1.5), 16, baselines=())
    stages = result.best.plan.stages
    assert len(stages) == 2 and stages[0].layers != stages[1].layers
    assert any(s.offload.any for s in stages)
    assert result.best.report.peak_memory_bytes <= 1.5 * MiB


def test_tuned_plan_is_never_slower_than_the_baselines():
    result = tune_training(SIX_LAYERS, small_cluster(3.0), 16)
    for name, baseline in result.baselines.items():
        assert baseline is not None, name
        assert result.best.report.iteration_time_s <= baseline.report.iteration_time_s * (1 + 1e-9), name
    assert result.baselines["megatron"].report.iteration_time_s > 1.5 * result.best.report.iteration_time_s


def test_baselines_report_none_when_their_space_has_no_fitting_plan():
    result = tune_training(SIX_LAYERS, small_cluster(1.5), 16)
    assert result.baselines["megatron"] is None and result.best.report.feasible


def test_nothing_fits_names_the_shortfall():
    with pytest.raises(InfeasiblePlan, match=r"nothing fits.*GiB on its fullest device.*GiB short"):
        tune_training("llama-3.1-405b", "1xa100-80gb", 1, baselines=())


def test_search_statistics_and_contract():
    result = tune_training("gpt-debug", "2xa100-80gb", 8, baselines=("megatron",))
    out = result.to_dict()
    assert set(out) >= {"plan", "report", "baselines", "search"}
    search = out["search"]
    assert search["evaluated"] == search["feasible"] + search["infeasible"] > 0
    assert search["evaluations_per_s"] > 0 and search["seconds"] > 0
    assert set(out["baselines"]["megatron"]) >= {"plan", "report"}
    # the plan is in the schema `simulate train` reads, and predicts the same report
    again = simulate_training("gpt-debug", "2xa100-80gb", out["plan"])
    assert again.iteration_time_s == pytest.approx(out["report"]["iteration_time_s"], rel=1e-12)


def test_pp1_closed_form_equals_discrete_event():
    result = tune_training("gpt3-125m", "1xa100-80gb", 8, baselines=())
    assert result.best.plan.pp == 1
    assert result.best.analytic_time_s == pytest.approx(result.best.report.iteration_time_s, rel=1e-9)


# --- the pieces ---------------------------------------------------------------------------

def test_milp_picks_the_balanced_assignment():
    # two stages, 4 layers: per-layer time 1 on stage 0 and 2 on stage 1 (e.g. the LM head)
    cands = [[Candidate(n, float(n), 0.0, None) for n in range(1, 4)],
             [Candidate(n, 2.0 * n, 0.0, None) for n in range(1, 4)]]
    choice, time_s = solve_stages(cands, 4, num_microbatches=8)
    assert [c.layers for c in choice] == [3, 1]  # T = (3, 2): max 3; (2, 2) -> T = (2, 4): max 4
    assert time_s == pytest.approx(7 * 3 + 5)


def test_milp_charges_boundary_extras_that_cannot_hide():
    # stage 1 has a big boundary extra unless it takes the slower candidate
    cands = [[Candidate(2, 2.0, 0.0, None)],
             [Candidate(2, 2.0, 50.0, None), Candidate(2, 2.5, 0.0, None)]]
    choice, time_s = solve_stages(cands, 4, num_microbatches=4)
    assert choice[1].D == 0.0
    assert time_s == pytest.approx(pipeline_time_s([2.0, 2.5], [0.0, 0.0], 4))


def test_milp_infeasible_layer_count_is_a_clear_error():
    cands = [[Candidate(1, 1.0, 0.0, None)], [Candidate(1, 1.0, 0.0, None)]]
    with pytest.raises(InfeasiblePlan, match="no assignment of 5 layers"):
        solve_stages(cands, 5, num_microbatches=2)


def test_closed_form_matches_1f1b_bubble():
    # equal stages: (m - 1) T + p T = (m + p - 1) T, the 1F1B makespan
    assert pipeline_time_s([1.0] * 4, [0.0] * 4, 8) == pytest.approx(11.0)
    # interleaving divides the fill/drain by v
    assert pipeline_time_s([1.0] * 4, [0.0] * 4, 8, virtual_stages=3) == pytest.approx(8 + 3 / 3)
    # the last stage's boundary extra hides behind the earlier stages' work
    assert pipeline_time_s([1.0, 1.0], [0.0, 0.5], 4) == pytest.approx(5.0)
    assert pipeline_time_s([1.0, 1.0], [0.0, 1.5], 4) == pytest.approx(5.5)


def test_pareto_frontier():
    T = np.array([1.0, 2.0, 3.0, 1.5, 2.5, 1.0])
    D = np.array([5.0, 3.0, 1.0, 4.0, 3.5, 6.0])
    front = pareto_frontier(T, D)
    assert list(front) == [0, 3, 1, 2]
    assert list(pareto_frontier(T, D, max_points=2)) == [0, 2]


def test_space_rules():
    model, cluster = load_model("gpt3-175b"), load_cluster("4x8xa100-80gb")
    found = list(layouts(model, cluster, 512))
    assert found and all(l.tp * l.pp * l.dp == 32 for l in found)
    assert all(l.tp <= 8 and 96 % l.tp == 0 for l in found)
    assert all(512 % (l.micro_batch_size * l.dp) == 0 for l in found)
    assert all(l.num_microbatches % l.pp == 0 for l in found if l.virtual_stages > 1)
    assert any(l.tp == 16 for l in layouts(model, cluster, 512, tp_within_node=False))
    grid = option_grid(dp=4)
    assert not np.any((grid["o_w"] > 0) & (grid["o_g"] == 0))  # weight offload needs gradient offload
    assert set(option_grid(dp=1)["zero"]) == {0.0}
    assert inflight_microbatches(0, 8, 64, 3) == pytest.approx(8 * (1 + 7 / 24))
    assert inflight_microbatches(7, 8, 64, 1) == 1
    assert all(n % 3 == 0 for n in layer_band(96, 8, 3))
