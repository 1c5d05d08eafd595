"""simulate_training end to end: overlap rules, the breakdown, recompute, utilization, traces,
what-if monotonicity and the pipeline bubble."""

from __future__ import annotations

import json

import pytest

from simulator.specs import load_cluster, load_model
from simulator.training import simulate_training

MODEL, CLUSTER = "gpt3-1.3b", "8xa100-80gb"

PLANS = {
    "gpipe": {"pp": 4, "dp": 2, "global_batch_size": 16, "schedule": "gpipe"},
    "1f1b": {"tp": 2, "pp": 2, "dp": 2, "global_batch_size": 16},
    "interleaved": {"pp": 4, "dp": 2, "global_batch_size": 16, "schedule": "interleaved",
                    "virtual_stages": 2},
    "zero3": {"dp": 8, "micro_batch_size": 2, "global_batch_size": 32, "zero_stage": 3},
    "offload": {"tp": 2, "dp": 4, "global_batch_size": 16, "zero_stage": 2,
                "offload": {"weights": 0.5, "optimizer": 1.0, "activations": 0.5}},
    "recompute_full": {"tp": 2, "pp": 2, "dp": 2, "global_batch_size": 16, "recompute": "full"},
    "recompute_selective": {"tp": 4, "pp": 2, "global_batch_size": 16, "recompute": "selective",
                            "sequence_parallel": True},
    "partial_checkpoint": {"pp": 2, "dp": 4, "global_batch_size": 16, "recompute": "full",
                           "checkpointed_layers": 5},
    "fp32_grads_zero1": {"tp": 2, "pp": 2, "dp": 2, "global_batch_size": 32, "zero_stage": 1,
                         "gradient_dtype": "fp32", "overlap_grad_reduce": False},
}


def sim(plan: dict, model: str = MODEL, cluster=CLUSTER, **kw):
    return simulate_training(model, cluster, plan, **kw)


# --- overlap rules ------------------------------------------------------------------------------

@pytest.mark.parametrize("plan", [
    {"dp": 8, "global_batch_size": 32},
    {"tp": 2, "pp": 2, "dp": 2, "global_batch_size": 16},
    {"dp": 8, "global_batch_size": 16, "zero_stage": 2},
])
def test_overlapping_grad_reduce_hides_dp_comm(plan):
    hidden = sim({**plan, "overlap_grad_reduce": True})
    exposed = sim({**plan, "overlap_grad_reduce": False})
    assert hidden.breakdown["dp_comm"] < exposed.breakdown["dp_comm"]
    assert hidden.iteration_time_s <= exposed.iteration_time_s
    # Overlap only moves communication; the compute it overlaps is unchanged.
    assert hidden.breakdown["compute"] == exposed.breakdown["compute"]


def test_grad_reduce_overlap_is_irrelevant_without_dp():
    plan = {"tp": 8, "global_batch_size": 8}
    a = sim({**plan, "overlap_grad_reduce": True})
    b = sim({**plan, "overlap_grad_reduce": False})
    assert a.breakdown["dp_comm"] == b.breakdown["dp_comm"] == 0.0
    assert a.iteration_time_s == b.iteration_time_s


@pytest.mark.parametrize("model", ["gpt3-1.3b", "megatron-gpt-22b"])
def test_overlapping_tp_comm_lowers_exposed_tp_comm(model):
    plan = {"tp": 8, "global_batch_size": 8}
    plain = sim({**plan, "overlap_tp_comm": False}, model)
    overlapped = sim({**plan, "overlap_tp_comm": True}, model)
    assert plain.breakdown["tp_comm"] > 0
    assert overlapped.breakdown["tp_comm"] < plain.breakdown["tp_comm"]
    assert overlapped.iteration_time_s < plain.iteration_time_s


# --- the breakdown --------------------------------------------------------------------------------

@pytest.mark.parametrize("name", PLANS)
def test_breakdown_sums_to_iteration_time(name):
    report = sim(PLANS[name])
    assert set(report.breakdown) == {"compute", "recompute", "tp_comm", "pp_comm", "dp_comm",
                                     "pipeline_bubble", "offload_stall", "optimizer"}
    assert all(v >= 0 for v in report.breakdown.values()), report.breakdown
    assert sum(report.breakdown.values()) == pytest.approx(report.iteration_time_s, rel=1e-9)


@pytest.mark.parametrize("name", PLANS)
def test_utilization_is_a_fraction(name):
    report = sim(PLANS[name])
    assert 0 < report.mfu < 1
    assert report.hfu >= report.mfu
    assert report.tokens_per_s > 0


def test_recompute_costs_full_over_selective_over_none():
    base = {"tp": 2, "pp": 2, "dp": 2, "global_batch_size": 16}
    none, sel, full = (sim({**base, "recompute": r}) for r in ("none", "selective", "full"))
    assert none.breakdown["recompute"] == 0
    assert full.breakdown["recompute"] > sel.breakdown["recompute"] > 0
    assert full.iteration_time_s > sel.iteration_time_s > none.iteration_time_s
    assert none.hfu == none.mfu
    assert full.hfu > sel.hfu > sel.mfu


def test_offload_stall_appears_only_with_offload():
    assert sim(PLANS["1f1b"]).breakdown["offload_stall"] == 0
    heavy = {"dp": 8, "global_batch_size": 8, "offload": {"weights": 1.0, "activations": 1.0}}
    assert sim(heavy).breakdown["offload_stall"] > 0


# --- trace --------------------------------------------------------------------------------------

def test_trace_is_written_when_asked(tmp_path):
    path = tmp_path / "iteration.json"
    report = sim(PLANS["1f1b"], trace_path=path)
    trace = json.loads(path.read_text())
    boxes = [e for e in trace["traceEvents"] if e.get("ph") == "X"]
    assert boxes
    # The trace spans the iteration (Chrome traces are in microseconds).
    end_us = max(e["ts"] + e["dur"] for e in boxes)
    assert end_us == pytest.approx(report.iteration_time_s * 1e6, rel=1e-6)
    # Tracing does not change the prediction.
    assert sim(PLANS["1f1b"]).iteration_time_s == report.iteration_time_s


# --- what-if monotonicity -------------------------------------------------------------------------

@pytest.mark.parametrize("plan", [
    {"tp": 8, "dp": 4, "global_batch_size": 32},
    {"tp": 8, "pp": 4, "global_batch_size": 32},
    {"tp": 2, "pp": 4, "dp": 4, "global_batch_size": 64, "schedule": "interleaved",
     "virtual_stages": 2},
    {"tp": 4, "dp": 8, "global_batch_size": 32, "zero_stage": 3},
    {"tp": 1, "pp": 2, "dp": 16, "global_batch_size": 64, "overlap_grad_reduce": False},
])
def test_faster_inter_node_links_never_slow_an_iteration(plan):
    cluster = load_cluster("4x8xa100-80gb")
    faster = cluster.model_copy(update={"inter_node_bandwidth_GBps": 2 * cluster.inter_node_bandwidth_GBps})
    slow, fast = sim(plan, cluster=cluster), sim(plan, cluster=faster)
    assert fast.iteration_time_s <= slow.iteration_time_s * (1 + 1e-12)
    comm = ("pp_comm", "dp_comm", "tp_comm")
    assert sum(fast.breakdown[k] for k in comm) <= sum(slow.breakdown[k] for k in comm) * (1 + 1e-12)


def test_faster_inter_node_links_speed_up_cross_node_data_parallel():
    plan = {"tp": 8, "dp": 4, "global_batch_size": 32, "overlap_grad_reduce": False}
    cluster = load_cluster("4x8xa100-80gb")
    faster = cluster.model_copy(update={"inter_node_bandwidth_GBps": 2 * cluster.inter_node_bandwidth_GBps})
    assert sim(plan, cluster=faster).iteration_time_s < sim(plan, cluster=cluster).iteration_time_s


@pytest.mark.parametrize("name", ["1f1b", "zero3", "interleaved", "recompute_selective"])
def test_h100_is_faster_than_a100(name):
    a100 = sim(PLANS[name], cluster="8xa100-80gb")
    h100 = sim(PLANS[name], cluster="8xh100")
    assert h100.iteration_time_s < a100.iteration_time_s
    assert h100.model_flops_per_iteration == a100.model_flops_per_iteration


# --- pipeline bubble ------------------------------------------------------------------------------

def test_pipeline_bubble_only_with_pipeline_parallelism():
    piped = sim({"tp": 2, "pp": 4, "global_batch_size": 8})
    flat = sim({"tp": 2, "dp": 4, "global_batch_size": 8})
    assert piped.breakdown["pipeline_bubble"] > 0
    assert flat.breakdown["pipeline_bubble"] == 0
    assert flat.breakdown["pp_comm"] == 0


def test_more_microbatches_shrink_the_bubble_share():
    """1F1B's bubble is (p-1)/(m+p-1) of the total: more micro-batches, smaller share."""
    shares = []
    for m in (4, 8, 32):
        r = sim({"tp": 2, "pp": 4, "global_batch_size": m})
        shares.append(r.breakdown["pipeline_bubble"] / r.iteration_time_s)
    assert shares[0] > shares[1] > shares[2] > 0


def test_interleaving_shrinks_the_bubble():
    plan = {"tp": 2, "pp": 4, "global_batch_size": 8}
    flat = sim(plan)
    inter = sim({**plan, "schedule": "interleaved", "virtual_stages": 2})
    assert inter.breakdown["pipeline_bubble"] < flat.breakdown["pipeline_bubble"]


def test_hfu_counts_recompute_flops_exactly():
    """Full recompute re-runs every layer's forward once: HFU/MFU = 1 + L*F_layer / (3*(L*F_layer + F_head))."""
    model = load_model("megatron-gpt-22b")
    plan = {"tp": 8, "micro_batch_size": 1, "global_batch_size": 4, "recompute": "full"}
    report = simulate_training(model, "8xa100-80gb", plan)
    h, s, L, V = model.hidden_size, model.seq_length, model.num_layers, model.vocab_size
    layer = 24 * s * h**2 + 4 * s**2 * h  # forward FLOPs of one GPT layer, one sequence
    head = 2 * s * h * V
    assert report.hfu / report.mfu == pytest.approx(1 + L * layer / (3 * (L * layer + head)), rel=1e-12)
