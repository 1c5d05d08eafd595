"""Per-device memory of a simulated plan: ZeRO identities, offloading, in-flight micro-batches
under each pipeline schedule, and the feasibility verdict."""

from __future__ import annotations

import pytest

from simulator.specs import load_cluster, load_model, load_plan
from simulator.training import simulate_training
from simulator.training.costs import TrainingCostModel

CLUSTER = "8xa100-80gb"


def states(report, stage: int = 0) -> float:
    mem = report.stages[stage].memory
    return mem["weights"] + mem["gradients"] + mem["optimizer"]


def shard_params(model: str, plan: dict) -> float:
    """P: parameters of the (only) stage per tensor-parallel shard, embeddings and head included."""
    m = load_model(model)
    costs = TrainingCostModel(m, load_plan(plan), load_cluster(CLUSTER))
    return costs.stage_params(m.num_layers, first=True, last=True)


# --- ZeRO (Rajbhandari et al., SC'20) ---------------------------------------------------------

ZERO_BF16 = {  # bytes per parameter with 16-bit gradients and Adam (K = 12), N-way sharding
    0: lambda N: 16,
    1: lambda N: 4 + 12 / N,
    2: lambda N: 2 + 14 / N,
    3: lambda N: 16 / N,
}


@pytest.mark.parametrize("model,tp", [("gpt-debug", 1), ("gpt-debug", 2), ("llama-debug", 2),
                                      ("gpt3-1.3b", 4)])
@pytest.mark.parametrize("zero", [0, 1, 2, 3])
def test_zero_model_states(model, tp, zero):
    N = 8 // tp
    plan = {"tp": tp, "dp": N, "global_batch_size": N, "zero_stage": zero, "gradient_dtype": "bf16"}
    report = simulate_training(model, CLUSTER, plan)
    P = shard_params(model, plan)
    assert states(report) == pytest.approx(ZERO_BF16[zero](N) * P, rel=1e-12)


@pytest.mark.parametrize("model,tp", [("gpt-debug", 1), ("megatron-gpt-22b", 8), ("gpt3-1.3b", 2)])
def test_megatron_distributed_optimizer_keeps_fp32_gradients(model, tp):
    N = 8 // tp
    plan = {"tp": tp, "dp": N, "global_batch_size": N, "zero_stage": 1, "gradient_dtype": "fp32"}
    report = simulate_training(model, CLUSTER, plan)
    assert states(report) == pytest.approx((6 + 12 / N) * shard_params(model, plan), rel=1e-12)
    # Without the distributed optimizer Megatron holds 18 bytes per parameter.
    plain = simulate_training(model, CLUSTER, {**plan, "zero_stage": 0})
    assert states(plain) == pytest.approx(18 * shard_params(model, plan), rel=1e-12)


# --- offloading ---------------------------------------------------------------------------------

BASE = {"tp": 2, "dp": 4, "global_batch_size": 8, "zero_stage": 1}


@pytest.mark.parametrize("offload", [
    {"weights": 0.5}, {"gradients": 0.25}, {"optimizer": 1.0}, {"activations": 0.75},
    {"weights": 0.3, "gradients": 0.6, "optimizer": 0.9, "activations": 0.1},
])
@pytest.mark.parametrize("model", ["gpt-debug", "gpt3-1.3b"])
def test_offload_removes_exactly_the_offloaded_share(model, offload):
    kept = simulate_training(model, CLUSTER, BASE).stages[0].memory
    moved = simulate_training(model, CLUSTER, {**BASE, "offload": offload}).stages[0].memory
    for kind in ("weights", "gradients", "optimizer", "activations"):
        assert moved[kind] == pytest.approx(kept[kind] * (1 - offload.get(kind, 0.0)), rel=1e-12)
    assert moved["other"] == kept["other"]


def test_activation_offload_lowers_the_peak():
    kept = simulate_training("gpt3-1.3b", CLUSTER, BASE)
    moved = simulate_training("gpt3-1.3b", CLUSTER, {**BASE, "offload": {"activations": 0.5}})
    assert moved.peak_memory_bytes < kept.peak_memory_bytes
    saved = kept.stages[0].memory["activations"] / 2
    assert kept.peak_memory_bytes - moved.peak_memory_bytes == pytest.approx(saved, rel=1e-9)


# --- activations held by pipeline schedules -----------------------------------------------------

@pytest.mark.parametrize("m", [1, 2, 3, 4, 8])
def test_1f1b_stage_i_holds_min_p_minus_i_and_m(m):
    p = 4
    plan = {"pp": p, "dp": 2, "micro_batch_size": 1, "global_batch_size": 2 * m}
    report = simulate_training("gpt-debug", CLUSTER, plan)
    assert [st.peak_inflight_microbatches for st in report.stages] == [min(p - i, m) for i in range(p)]
    # Equal stages (one layer each) hold activations in proportion to their micro-batches.
    act = [st.memory["activations"] for st in report.stages]
    assert act == pytest.approx([act[-1] * min(p - i, m) for i in range(p)], rel=1e-12)


def test_gpipe_holds_every_microbatch_on_every_stage():
    m = 6
    report = simulate_training("gpt-debug", CLUSTER, {"pp": 4, "dp": 2, "global_batch_size": 2 * m,
                                                      "schedule": "gpipe"})
    assert [st.peak_inflight_microbatches for st in report.stages] == [m] * 4


@pytest.mark.parametrize("model,tp,p,v,m", [
    ("gpt-debug", 1, 2, 2, 4),
    ("gpt3-1.3b", 2, 4, 2, 8),
    ("gpt3-1.3b", 2, 4, 3, 8),
    ("gpt3-1.3b", 1, 8, 3, 16),
])
def test_interleaving_scales_first_stage_activations(model, tp, p, v, m):
    """Korthikanti et al. Sec. 4.2.3: interleaving multiplies stage 0's by 1 + (p-1)/(p*v)."""
    dp = 8 // (tp * p)
    plan = {"tp": tp, "pp": p, "dp": dp, "global_batch_size": dp * m}
    flat = simulate_training(model, CLUSTER, plan)
    inter = simulate_training(model, CLUSTER, {**plan, "schedule": "interleaved", "virtual_stages": v})
    ratio = inter.stages[0].memory["activations"] / flat.stages[0].memory["activations"]
    assert ratio == pytest.approx(1 + (p - 1) / (p * v), rel=1e-12)


# --- feasibility --------------------------------------------------------------------------------

def test_gpt3_175b_does_not_fit_data_parallel_on_one_node():
    report = simulate_training("gpt3-175b", CLUSTER, {"dp": 8, "global_batch_size": 8, "zero_stage": 0})
    assert report.feasible is False
    assert report.peak_memory_bytes > report.device_memory_bytes
    assert "stage 0" in report.infeasible_reason
    assert "GiB" in report.infeasible_reason


def test_debug_model_fits():
    report = simulate_training("gpt-debug", "2xa100-80gb", "debug")
    assert report.feasible is True
    assert report.infeasible_reason is None
    assert 0 < report.peak_memory_bytes <= report.device_memory_bytes
