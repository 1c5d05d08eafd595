"""The engine's CPU time per step (fixed + per sequence + per context token) as small timelines,
and the vLLM 0.2 step rules the load validation rests on (prefill-only steps stall decodes)."""

from __future__ import annotations

import pytest

from simulator.serving.engine_overhead import EngineOverhead
from simulator.serving.iteration import IterationModel, Work
from simulator.serving.kv_cache import BlockManager
from simulator.serving.schedulers import StaticScheduler
from simulator.serving.sequence import Seq
from simulator.serving.workload import Request
from simulator.specs.catalog import load_cluster, load_model
from simulator.specs.serving import DeploymentSpec, EngineSpec, Parallel


def engine(**fields) -> EngineSpec:
    return DeploymentSpec.parse({"engine": {"step_overhead_us": 5000, **fields}}).engine


def test_a_step_of_b_sequences_pays_fixed_plus_b_per_sequence_plus_its_context_tokens():
    cost = EngineOverhead.of(engine(per_sequence_overhead_us=50, per_context_token_overhead_us=0.4), 0.0)
    works = [Work(1, 999, 1)] * 30  # 30 decoding sequences of 1,000 tokens each after this step
    parts = cost.breakdown(works)
    assert parts == pytest.approx({"step": 5e-3, "sequences": 30 * 50e-6, "context_tokens": 30_000 * 0.4e-6})
    assert cost.seconds(works) == pytest.approx(5e-3 + 1.5e-3 + 12e-3)
    assert cost.seconds([]) == 0.0  # an empty step costs nothing


def test_prompt_tokens_count_as_context_of_a_prefill_step():
    cost = EngineOverhead.of(engine(per_context_token_overhead_us=1.0), 0.0)
    assert cost.breakdown([Work(800, 0, 1), Work(200, 0, 1)])["context_tokens"] == pytest.approx(1000e-6)


def test_without_an_engine_the_device_overhead_applies_alone():
    cost = EngineOverhead.of(None, 3000.0)
    assert cost.seconds([Work(1, 5000, 1)] * 100) == pytest.approx(3e-3)


def test_iteration_time_grows_by_exactly_the_engine_overhead():
    model, cluster = load_model("opt-13b"), load_cluster("1xa100-80gb")
    base = IterationModel(model, cluster, Parallel(), engine())
    heavy = IterationModel(model, cluster, Parallel(),
                           engine(per_sequence_overhead_us=50, per_context_token_overhead_us=0.4))
    for b, context in [(1, 100), (16, 800), (64, 1500)]:
        works = [Work(1, context, 1)] * b
        extra = b * 50e-6 + b * (context + 1) * 0.4e-6
        assert heavy.step_s(works) - base.step_s(works) == pytest.approx(extra)


def test_bad_engine_field_names_the_field():
    with pytest.raises(Exception, match="per_context_token_overhead_us"):
        engine(per_context_token_overhead_us=-1)


def test_catalog_profile_of_the_ray_served_vllm_cites_its_parts():
    named = DeploymentSpec.parse({"engine": "vllm-0.2-ray"}).engine
    assert (named.step_overhead_us, named.per_sequence_overhead_us, named.per_context_token_overhead_us) == (5000, 50, 0.43)
    assert "6854" in named.source and "DistServe" in named.source


def test_vllm_waiting_prompt_gets_a_prefill_only_step_that_stalls_the_decodes():
    # vLLM 0.2 (prefill priority): a prompt that fits is prefilled alone; running sequences wait
    kv = BlockManager(num_gpu_blocks=100, block_size=4, watermark=0.0)
    sched = StaticScheduler(DeploymentSpec(block_size=4), kv)
    a, b = Seq(Request(0, 0.0, 8, 4)), Seq(Request(1, 0.0, 8, 4))
    sched.add(a)
    sched.commit(sched.plan(), 1.0)  # a prefilled, decoding
    assert sched.plan().kind == "decode"
    sched.add(b)
    step = sched.plan()
    assert step.kind == "prefill" and step.seqs == [b]  # a makes no token in this step
    sched.commit(step, 2.0)
    step = sched.plan()
    assert step.kind == "decode" and step.seqs == [a, b]


def test_vllm_admits_in_arrival_order_and_stops_at_the_first_prompt_that_does_not_fit():
    # FCFS: a later, smaller prompt does not jump a waiting one that needs more blocks
    kv = BlockManager(num_gpu_blocks=4, block_size=4, watermark=0.0)
    sched = StaticScheduler(DeploymentSpec(block_size=4), kv)
    big, small = Seq(Request(0, 0.0, 20, 2)), Seq(Request(1, 0.0, 4, 2))
    sched.add(big)
    sched.add(small)
    assert sched.plan() is None and list(sched.waiting) == [big, small]
