"""The torch decoder built from a spec matches the simulator's symbolic shapes."""

from __future__ import annotations

import pytest
import torch

from executor.training.model import Block, Decoder
from simulator.costs.compile import compiled_costs
from simulator.costs.symbols import model_values
from simulator.specs.catalog import load_model


def symbolic(spec, key):
    values = {**model_values(spec), "t": 1, "b": 1, "s": 1, "d": 1, "flash": 1.0, "sq": 0.0, "L_st": 1.0}
    return float(compiled_costs()(values)[key])


@pytest.mark.parametrize("name", ["gpt-debug", "llama-debug", "gpt3-125m", "smollm2-135m"])
def test_block_parameters_equal_the_symbolic_count(name):
    spec = load_model(name)
    assert sum(p.numel() for p in Block(spec).parameters()) == symbolic(spec, "layer_params")


@pytest.mark.parametrize("name", ["gpt-debug", "llama-debug"])
def test_decoder_trains_one_step(name):
    torch.manual_seed(0)
    spec = load_model(name)
    model = Decoder(spec, layers=2)
    tokens = torch.randint(0, spec.vocab_size, (2, spec.seq_length))
    logits = model(tokens)
    assert logits.shape == (2, spec.seq_length, spec.vocab_size)
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten())
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    assert loss.item() == pytest.approx(torch.log(torch.tensor(float(spec.vocab_size))).item(), rel=0.3)


def test_causal_attention_ignores_future_tokens():
    torch.manual_seed(0)
    spec = load_model("llama-debug")
    block = Block(spec).eval()
    x = torch.randn(1, 8, spec.hidden_size)
    y = x.clone()
    y[:, 5:] = torch.randn(1, 3, spec.hidden_size)
    assert torch.allclose(block(x)[:, :5], block(y)[:, :5], atol=1e-5)
