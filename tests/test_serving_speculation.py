"""Speculative decoding inside the serving engine: n-gram drafts verified in one forward,
greedy output equal to the engine's without speculation, acceptance counted, rejected KV
slots rolled back, speculative sampling's distribution, bad combinations refused by field.

Needs torch, gguf and the SmolLM2 weights; skipped without them. fp32, one thread, short
prompts and a dozen output tokens.
"""

from __future__ import annotations

import pytest
from smollm2 import GGUF, one_torch_thread, torch

from executor.serving import model as M
from executor.serving.engine import Engine, EngineConfig, RequestRejected
from executor.serving.sampling import SamplingParams, nucleus_probs
from executor.serving.spec_engine import verify_greedy, verify_sampled
from simulator.errors import SpecError
from simulator.specs.serving import DeploymentSpec, SpeculationSpec

NEW = 14
GREEDY = SamplingParams(max_tokens=NEW, temperature=0.0, ignore_eos=True)
ACCEPTANCE = {"distribution": "fixed", "mean": 0.6}


def spec(policy: str = "fixed", **kw) -> SpeculationSpec:
    return SpeculationSpec(draft="ngram", policy=policy, acceptance=ACCEPTANCE, **kw)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    with one_torch_thread():
        yield


@pytest.fixture(scope="module")
def decoder():
    return M.load_decoder(GGUF)


@pytest.fixture(scope="module")
def prompts():
    """Two repetitive prompts (a random phrase said three times: n-grams hit) and two random ones."""
    g = torch.Generator().manual_seed(1)
    phrase = [torch.randint(100, 40000, (n,), generator=g).tolist() for n in (6, 9)]
    return [phrase[0] * 3, phrase[1] * 3] + [torch.randint(100, 40000, (n,), generator=g).tolist()
                                             for n in (5, 21)]


@pytest.fixture(scope="module")
def plain(decoder, prompts):
    """The engine's greedy output without speculation."""
    eng = Engine(decoder, EngineConfig(num_blocks=64, block_size=4))
    return [s.output_ids for s in eng.generate(prompts, GREEDY)]


@pytest.mark.parametrize("policy", [spec("fixed", k=3), spec("adaptive", k_max=4)], ids=["fixed-k3", "adaptive"])
def test_greedy_output_with_speculation_equals_the_engine_without(decoder, prompts, plain, policy):
    eng = Engine(decoder, EngineConfig(num_blocks=64, block_size=4, speculation=policy))
    outs = eng.generate(prompts, GREEDY)
    assert [s.output_ids for s in outs] == plain
    assert all(s.finish_reason == "length" and len(s.output_ids) == NEW for s in outs)
    stats = eng.spec.stats()
    assert stats["accepted"] > 0 and stats["accepted_per_step"] > 0      # the repeated phrases hit
    assert stats["drafted"] >= stats["accepted"]
    assert eng.stats.output_tokens == len(prompts) * NEW
    # every rejected slot and every finished sequence's blocks are back in the pool
    assert eng.kv.used_blocks == 0 and eng.blocks.num_used_gpu_blocks == 0
    assert sorted(eng.kv.free) == list(range(64))
    if policy.policy == "adaptive":
        assert stats["table"] and set(stats["k_histogram"]) <= set(range(policy.k_max + 1))


def test_rejected_slots_are_rolled_back_during_the_run(decoder, prompts):
    """After every step each sequence holds exactly the blocks of its committed tokens."""
    eng = Engine(decoder, EngineConfig(num_blocks=64, block_size=4, speculation=spec("fixed", k=4)))
    seqs = [eng.add_request(p, GREEDY) for p in prompts]
    while eng.has_unfinished():
        eng.step()
        for s in seqs:
            if s.id in eng.blocks:
                cached = len(s.prompt_ids) + len(s.output_ids) - 1   # the pending token is not cached
                assert eng.blocks.tokens(s.id) == cached
                assert len(eng.kv.tables[s.id]) == -(-cached // 4)
    assert eng.spec.speculator.rejections > 0 and eng.kv.used_blocks == 0


def test_stop_token_and_max_tokens_cut_the_accepted_tokens(decoder, prompts, plain):
    eng = Engine(decoder, EngineConfig(num_blocks=64, block_size=4, speculation=spec("fixed", k=3)))
    stop_at = plain[0][5]   # a token in the middle of a run of accepted drafts
    a = eng.add_request(prompts[0], SamplingParams(max_tokens=NEW, temperature=0.0, ignore_eos=True,
                                                   stop_token_ids=(stop_at,)))
    b = eng.add_request(prompts[1], SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True))
    eng.run_until_done()
    assert a.output_ids == plain[0][:plain[0].index(stop_at) + 1] and a.finish_reason == "stop"
    assert b.output_ids == plain[1][:5] and b.finish_reason == "length"
    assert eng.kv.used_blocks == 0


def test_goodput_and_sampled_requests_run(decoder, prompts):
    eng = Engine(decoder, EngineConfig(num_blocks=64, block_size=4, speculation=spec("goodput", k_max=4)))
    sampled = SamplingParams(max_tokens=8, temperature=0.8, seed=3, ignore_eos=True)
    outs = eng.generate(prompts, [GREEDY, sampled, GREEDY, sampled])
    assert [len(s.output_ids) for s in outs] == [NEW, 8, NEW, 8]
    assert eng.spec.stats()["decode_steps"] > 0 and eng.kv.used_blocks == 0
    pytest.importorskip("fastapi")
    from types import SimpleNamespace

    from executor.serving.server import prometheus_text

    text = prometheus_text(SimpleNamespace(engine=eng, queue_length=0, step_errors=0))
    assert f"simtune_spec_accepted_tokens_total {eng.spec.speculator.accepted}" in text


def test_verify_greedy_takes_the_matching_prefix_and_one_more():
    logits = torch.full((4, 6), -1.0)
    for row, best in enumerate([2, 5, 1, 3]):
        logits[row, best] = 1.0
    assert verify_greedy(logits, [2, 5, 4]) == (2, [2, 5, 1])
    assert verify_greedy(logits, [2, 5, 1]) == (3, [2, 5, 1, 3])
    assert verify_greedy(logits[:1], []) == (0, [2])


def test_speculative_sampling_keeps_the_target_distribution():
    """The first committed token is distributed as the target's p, whatever the draft."""
    logits = torch.tensor([[1.0, 0.2, -0.5, 0.7], [0.0, 0.0, 0.0, 0.0]])
    params = SamplingParams(temperature=1.0)
    p = nucleus_probs(logits[0], 1.0, 1.0)
    g = torch.Generator().manual_seed(0)
    n = 4000
    counts = torch.zeros(4)
    for _ in range(n):
        counts[verify_sampled(logits, [1], params, g)[1][0]] += 1
    assert torch.allclose(counts / n, p, atol=0.03)


def test_bad_combinations_are_refused_by_field(decoder):
    cases = [
        (dict(tp=2), "deployment.speculation"),
        (dict(scheduler="sarathi"), "deployment.scheduler"),
    ]
    for overrides, field in cases:
        with pytest.raises(SpecError) as exc:
            Engine(decoder, EngineConfig(speculation=spec(), **overrides))
        assert field in str(exc.value)
    with pytest.raises(SpecError) as exc:
        Engine(decoder, EngineConfig(speculation=SpeculationSpec(draft="llama-68m", acceptance=ACCEPTANCE)))
    assert "deployment.speculation.draft" in str(exc.value)
    dep = DeploymentSpec(prefill={"tp": 2}, speculation=spec())
    with pytest.raises(SpecError, match="deployment.speculation"):
        EngineConfig.from_deployment(dep)
    config = EngineConfig.from_deployment(DeploymentSpec(speculation=spec("adaptive")))
    assert config.speculation.policy == "adaptive"
    with pytest.raises(RequestRejected, match="logprobs") as exc:   # verified tokens report none
        Engine(decoder, EngineConfig(speculation=spec())).add_request([5, 6, 7], SamplingParams(logprobs=1))
    assert exc.value.param == "logprobs"


def test_simtune_serve_refuses_speculation_it_cannot_run(tmp_path):
    """Refused before the model loads, with the field named."""
    from typer.testing import CliRunner

    from simtune.cli import app

    runner = CliRunner()
    for extra, field in [("prefill: {tp: 2, pp: 1}\n", "deployment.speculation"),
                         ("", "deployment.speculation.draft")]:
        draft = "ngram" if extra else "llama-68m"
        path = tmp_path / "dep.yaml"
        path.write_text(f"{extra}scheduler: vllm\nspeculation:\n  draft: {draft}\n  policy: fixed\n  k: 3\n"
                        f"  acceptance: {{distribution: fixed, mean: 0.6}}\n")
        result = runner.invoke(app, ["serve", "--deployment", str(path)])
        assert result.exit_code != 0 and field in result.output + result.stderr



def test_preemption_under_speculation_keeps_greedy_output(decoder, prompts, plain):
    # 12 blocks of 4 admit both prompts (18 and 21 tokens), then cannot grow both to the end
    # (prompt + 14 tokens + 3 draft slots: 9 and 10 blocks)
    eng = Engine(decoder, EngineConfig(num_blocks=12, block_size=4, watermark=0.0, speculation=spec("fixed", k=3)))
    outs = eng.generate([prompts[0], prompts[3]], GREEDY)
    assert eng.scheduler.preemptions > 0
    assert [s.output_ids for s in outs] == [plain[0], plain[3]] and eng.kv.used_blocks == 0
