"""Speculative decoding model: expected tokens against Monte-Carlo, the shape of k*(b), the
k = 0 rule, measured-profile interpolation, speculation inside the serving simulator, and
bad inputs."""

from __future__ import annotations

import numpy as np
import pytest

from simulator.errors import SpecError
from simulator.serving import simulate
from simulator.serving.simulate import simulate_serving
from simulator.specs.catalog import load_cluster, load_model
from simulator.specs.serving import AcceptanceSpec, DeploymentSpec, Parallel, SpeculationSpec
from simulator.speculation import (
    MeasuredStepCost,
    ModelStepCost,
    expected_tokens,
    goodput_k,
    mean_expected_tokens,
    policy_table,
    sample_accepted,
    sample_rates,
    steady_tokens_per_step,
)


class Roofline:
    """A target that is memory-bound up to `ridge` tokens per step, then compute-bound; the
    draft costs a fixed fraction `c` of a one-token target step."""

    def __init__(self, ridge: int = 64, c: float = 0.05, per_token_s: float = 1e-3):
        self.ridge, self.c, self.per_token_s = ridge, c, per_token_s

    def target_s(self, batch, tokens_per_seq, context):
        return self.per_token_s * max(self.ridge, batch * tokens_per_seq)

    def draft_s(self, batch, context):
        return self.c * self.target_s(batch, 1, context)


def fixed(mean: float) -> AcceptanceSpec:
    return AcceptanceSpec(mean=mean)


# -- expected tokens ------------------------------------------------------------------------------


@pytest.mark.parametrize("a,k", [(0.3, 1), (0.6, 4), (0.9, 8), (0.75, 0)])
def test_expected_tokens_matches_monte_carlo(a, k):
    rng = np.random.default_rng(0)
    draws = np.array([sample_accepted(a, k, rng) + 1 for _ in range(40_000)])
    assert draws.max() <= k + 1
    assert draws.mean() == pytest.approx(expected_tokens(a, k), rel=0.015)
    assert expected_tokens(a, k) == pytest.approx(sum(a**j for j in range(k + 1)))


def test_mean_expected_tokens_over_a_beta_distribution_matches_sampling():
    acc = AcceptanceSpec(distribution="beta", mean=0.6, concentration=4.0)
    rates = sample_rates(acc, 200_000, np.random.default_rng(1))
    assert rates.mean() == pytest.approx(0.6, abs=0.005)
    assert mean_expected_tokens(acc, 1) == pytest.approx(expected_tokens(0.6, 1))  # linear in a
    for k in (2, 3, 6):
        sampled = float(np.mean(expected_tokens(rates, k)))
        assert mean_expected_tokens(acc, k) == pytest.approx(sampled, rel=0.005)
        # E(a, k) is convex in a: spread across requests raises the mean above E(mean a)
        assert mean_expected_tokens(acc, k) > expected_tokens(0.6, k)


def test_steady_state_slot_throughput_is_the_harmonic_mean_a_refilled_slot_achieves():
    """One batch slot serving requests back to back, simulated token by token: the tokens it
    commits per step approach the harmonic mean of E(a_i, k), below the arithmetic mean."""
    rates = [0.1, 0.5, 0.9]
    acc = AcceptanceSpec(distribution="empirical", values=rates)
    rng = np.random.default_rng(2)
    k, length, tokens, steps = 4, 200, 0, 0
    for i in range(600):
        a, left = rates[i % 3], length
        while left > 0:
            left -= sample_accepted(a, k, rng) + 1
            steps += 1
        tokens += length
    assert tokens / steps == pytest.approx(steady_tokens_per_step(acc, k), rel=0.02)
    assert steady_tokens_per_step(acc, k) < mean_expected_tokens(acc, k) * 0.85
    beta = AcceptanceSpec(distribution="beta", mean=0.6, concentration=4.0)
    draws = sample_rates(beta, 200_000, np.random.default_rng(3))
    hm = 1.0 / np.mean(1.0 / expected_tokens(draws, k))
    assert steady_tokens_per_step(beta, k) == pytest.approx(hm, rel=0.005)


# -- the choice of k ------------------------------------------------------------------------------


def test_k_star_falls_with_batch_size_on_a_memory_then_compute_bound_target():
    table = policy_table(Roofline(ridge=64), fixed(0.7), [1, 2, 4, 8, 16, 32, 64, 128], k_max=8)
    ks = [r.k for r in table.rows]
    assert ks == sorted(ks, reverse=True), ks
    assert ks[0] >= 4 and ks[-1] == 0
    for row in table.rows:  # k*(b) is at least as good as the best fixed k everywhere
        assert row.speedup_over_fixed >= 1.0
        assert row.tokens_per_s == max(row.tokens_per_s_by_k)


def test_k_star_is_non_increasing_for_the_symbolic_a100_model():
    model, cluster = load_model("llama-2-7b"), load_cluster("1xa100-80gb")
    spec = SpeculationSpec(draft="llama-68m", acceptance=fixed(0.8))
    cost = ModelStepCost.build(model, cluster, Parallel(), spec)
    table = policy_table(cost, spec.acceptance, [1, 4, 16, 64, 256, 1024], k_max=8, context=512)
    ks = [r.k for r in table.rows]
    assert ks == sorted(ks, reverse=True) and ks[0] > 0 and ks[-1] < ks[0], ks
    assert table.rows[0].speedup > 1.5  # memory-bound batch 1: drafts nearly free


def test_an_engine_that_pays_cpu_time_per_draft_step_speculates_less():
    model, cluster = load_model("llama-2-7b"), load_cluster("1xa100-80gb")
    spec = SpeculationSpec(draft="llama-68m", acceptance=fixed(0.6))
    lean = ModelStepCost.build(model, cluster, Parallel(), spec)
    heavy = ModelStepCost.build(model, cluster, Parallel(), spec,
                                DeploymentSpec.parse({"engine": {"step_overhead_us": 1500,
                                                                 "draft_step_overhead_us": 3000}}).engine)
    assert heavy.draft_s(1, 512) - lean.draft_s(1, 512) == pytest.approx(3000e-6)
    k_lean = policy_table(lean, spec.acceptance, [1], 8).rows[0].k
    k_heavy = policy_table(heavy, spec.acceptance, [1], 8).rows[0].k
    assert k_heavy < k_lean


@pytest.mark.parametrize("a,expect_zero", [(0.30, True), (0.34, True), (0.40, False)])
def test_k_is_zero_when_acceptance_is_below_the_draft_cost_ratio(a, expect_zero):
    cost = Roofline(ridge=10**6, c=0.35)  # always memory-bound: only the draft costs
    table = policy_table(cost, fixed(a), [1, 8], k_max=8)
    assert all((r.k == 0) == expect_zero for r in table.rows)
    assert (goodput_k(cost, [a] * 8, 512, 8) == 0) == expect_zero


def test_measured_profile_is_made_non_decreasing_in_tokens_per_sequence():
    noisy = {"context": 100, "target": [{"batch_size": 1, "tokens_per_seq": n, "seconds": s}
                                        for n, s in zip((1, 2, 3, 4), (0.020, 0.040, 0.030, 0.050))]}
    cost = MeasuredStepCost(noisy, monotone=True)
    assert [cost.target_s(1, n, 100) for n in (1, 2, 3, 4)] == pytest.approx([0.020, 0.035, 0.035, 0.050])
    assert MeasuredStepCost(noisy).target_s(1, 3, 100) == 0.030  # as measured by default


def test_measured_profile_interpolates_in_batch_size_and_refuses_to_extrapolate():
    profile = {"context": 300,
               "target": [{"batch_size": b, "tokens_per_seq": n, "seconds": 0.01 * b * n}
                          for b in (1, 4) for n in (1, 2)],
               "draft": [{"batch_size": 1, "seconds": 0.001}, {"batch_size": 4, "seconds": 0.002}]}
    cost = MeasuredStepCost(profile)
    assert cost.target_s(2, 2, 300) == pytest.approx(0.04)
    assert cost.draft_s(3, 300) == pytest.approx(0.001 + 2 / 3 * 0.001)
    with pytest.raises(ValueError, match="batch = 8: outside the measured target batch sizes 1..4"):
        cost.target_s(8, 1, 300)
    with pytest.raises(ValueError, match="tokens_per_seq = 3: not measured"):
        cost.target_s(1, 3, 300)


# -- inside the serving simulator -----------------------------------------------------------------


def workload(n=60, rate=None, out=96):
    wl = {"num_requests": n, "input_tokens": {"value": 256}, "output_tokens": {"value": out}}
    if rate:
        wl["arrival"] = {"kind": "poisson", "rate_per_s": rate}
    return wl


def speculative(policy="fixed", a=0.8, draft="llama-68m", **fields):
    return {"speculation": {"draft": draft, "policy": policy, "acceptance": {"mean": a}, **fields}}


@pytest.fixture
def seqs_of_run(monkeypatch):
    seen = {}
    real = simulate.build_report

    def build_report(model, cluster, deployment, workload, seqs, stats):
        seen["seqs"] = seqs
        return real(model, cluster, deployment, workload, seqs, stats)

    monkeypatch.setattr(simulate, "build_report", build_report)
    return seen


def test_speculation_cuts_low_load_tpot_and_generates_every_token_exactly(seqs_of_run):
    plain = simulate_serving("llama-2-7b", "1xa100-80gb", {}, workload(rate=0.5))
    spec = simulate_serving("llama-2-7b", "1xa100-80gb", speculative(k=4), workload(rate=0.5))
    assert all(s.generated == s.req.output_tokens for s in seqs_of_run["seqs"])
    expected = expected_tokens(0.8, 4)  # tokens per step; a step costs more than a plain one
    assert 1.5 < plain.tpot_s["p50"] / spec.tpot_s["p50"] < expected
    st = spec.speculation
    assert st["k_histogram"] == {4: st["decode_steps"]}
    assert st["acceptance_rate"] == pytest.approx(0.8, abs=0.03)  # the estimator recovers a


def test_speculative_kv_slots_are_reserved_then_trimmed(monkeypatch, seqs_of_run):
    """A memory-tight run: every step reserves k + 1 slots; the blocks never run out and
    every sequence ends with exactly its tokens."""
    from simulator.serving.kv_cache import BlockManager

    managers = []

    class Checked(BlockManager):
        def truncate(self, seq_id, num_tokens):
            super().truncate(seq_id, num_tokens)
            assert self.blocks(seq_id) == self.blocks_for(num_tokens)
            assert 0 <= self.num_used_gpu_blocks <= self.num_gpu_blocks

    monkeypatch.setattr(simulate, "BlockManager", lambda *a, **kw: managers.append(Checked(*a, **kw)) or managers[-1])
    dep = {**speculative(k=6), "gpu_memory_utilization": 0.3}
    report = simulate_serving("llama-2-7b", "1xa100-80gb", dep, workload(n=300, out=512))
    assert report.num_requests == 300 and report.preemptions > 0
    assert all(s.generated == s.req.output_tokens for s in seqs_of_run["seqs"])
    assert managers[0].num_used_gpu_blocks == 0


def test_adaptive_and_goodput_policies_stop_speculating_at_large_batches():
    offline = workload(n=512, out=64)
    adaptive = simulate_serving("llama-2-7b", "1xa100-80gb", {**speculative("adaptive", a=0.6), "max_num_seqs": 512}, offline)
    table = adaptive.speculation["table"]
    assert table[1] > 0 and table[512] < table[1]
    low = simulate_serving("llama-2-7b", "1xa100-80gb", speculative("goodput", a=0.05), workload())
    assert low.speculation["k_histogram"] == {0: low.speculation["decode_steps"]}


# -- bad inputs -----------------------------------------------------------------------------------


@pytest.mark.parametrize("a", [0.0, 1.0, -0.2, 1.5])
def test_acceptance_outside_the_open_unit_interval_is_refused(a):
    with pytest.raises(ValueError, match=r"must be in \(0, 1\)"):
        expected_tokens(a, 3)
    with pytest.raises(SpecError) as err:
        DeploymentSpec.parse(speculative(a=a))
    assert err.value.field == "deployment.speculation.acceptance.mean"


def test_negative_k_is_refused():
    with pytest.raises(ValueError, match="k = -1: must be an integer >= 0"):
        expected_tokens(0.5, -1)
    with pytest.raises(SpecError) as err:
        DeploymentSpec.parse(speculative(k=-1))
    assert err.value.field == "deployment.speculation.k"


@pytest.mark.parametrize("dep,field,message", [
    (speculative(draft="opt-125m"), "deployment.speculation.draft", "must share the target's tokenizer"),
    ({**speculative(), "scheduler": "sarathi"}, "deployment.speculation", "needs the 'vllm' scheduler"),
    (speculative(draft="llama-68m", draft_tp=2), "deployment.speculation.draft_tp", "<= the target's tp = 1"),
    ({"speculation": {"draft": "llama-68m", "acceptance": {"distribution": "empirical", "values": [0.5, 1.0]}}},
     "deployment.speculation.acceptance.values", "every rate must be in (0, 1)"),
])
def test_bad_speculation_names_the_field(dep, field, message):
    with pytest.raises(SpecError) as err:
        simulate_serving("llama-2-7b", "1xa100-80gb", dep, workload(n=4))
    assert err.value.field == field and message in str(err.value)


def test_a_learning_adaptive_policy_rebuilds_its_table_from_the_measured_acceptance():
    """learn_acceptance: the table built on the prior (0.9) is rebuilt once the pooled counts say
    otherwise (accepted 10 of 100 drafts' outcomes: 0.1 with the prior's weight of 20 drafts ->
    ~0.23), and it drafts less at b = 1; counts that agree with the prior keep the table."""
    from simulator.speculation import Speculator

    spec = SpeculationSpec(draft="llama-68m", policy="adaptive", acceptance=AcceptanceSpec(mean=0.9),
                           learn_acceptance=True)
    cost = ModelStepCost.build(load_model("llama-2-7b"), load_cluster("1xa100-80gb"), Parallel(), spec)
    sp = Speculator(spec, cost, 512.0, np.random.default_rng(0), 64)
    before = sp.k_for_batch(1, None)
    assert sp.tables_built == 1 and before > 0
    sp.accepted, sp.rejections = 90, 10          # agrees with the prior: no rebuild
    sp.k_for_batch(1, None)
    assert sp.tables_built == 1
    sp.accepted, sp.rejections = 10, 90
    after = sp.k_for_batch(1, None)
    assert sp.tables_built == 2 and sp.table_acceptance == pytest.approx((10 + 0.9 * 20) / 120)
    assert after < before
    assert sp.stats()["table_acceptance"] == sp.table_acceptance
    fixed = Speculator(spec.model_copy(update={"learn_acceptance": False}), cost, 512.0, np.random.default_rng(0), 64)
    fixed.accepted, fixed.rejections = 10, 90
    assert fixed.k_for_batch(1, None) == before and fixed.tables_built == 1
