"""The symbolic cost formulas against independent counts and the published closed forms.

Parameters are counted on real torch modules (built on the meta device, so GPT-3 175B
allocates nothing), forward FLOPs with torch's FlopCounterMode on a real block, and the
closed forms of Narayanan et al. (SC'21) and Korthikanti et al. (MLSys'23) are compared
with what the simulator computes.
"""

from __future__ import annotations

import pytest
import sympy as sp
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from simulator.costs import symbols as S
from simulator.costs.compile import compiled_costs
from simulator.costs.symbols import model_values
from simulator.costs.transformer import (
    checkpoint_activation_bytes,
    layer_activation_bytes,
    stage_activation_bytes,
)
from simulator.specs import load_cluster, load_model, load_plan
from simulator.training import simulate_training
from simulator.training.costs import TrainingCostModel

# --- reference modules ------------------------------------------------------------------------


class RMSNorm(nn.Module):
    def __init__(self, h: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(h))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight


def attention(q, k, v, heads: int, kv_heads: int):
    """Causal attention with explicit q@k^T and p@v, so the FLOP counter sees both products."""
    b, s, h = q.shape
    d = h // heads
    q = q.view(b, s, heads, d).transpose(1, 2)
    k = k.view(b, s, kv_heads, d).transpose(1, 2).repeat_interleave(heads // kv_heads, dim=1)
    v = v.view(b, s, kv_heads, d).transpose(1, 2).repeat_interleave(heads // kv_heads, dim=1)
    scores = q @ k.transpose(-2, -1) / d**0.5
    mask = torch.ones(s, s, dtype=torch.bool, device=q.device).triu(1)
    p = scores.masked_fill(mask, float("-inf")).softmax(-1)
    return (p @ v).transpose(1, 2).reshape(b, s, h)


class GPTBlock(nn.Module):
    """GPT-2/3 layer: LayerNorm, biased QKV and projection, LayerNorm, biased GELU MLP."""

    def __init__(self, h: int, a: int, f: int):
        super().__init__()
        self.a = a
        self.ln1, self.ln2 = nn.LayerNorm(h), nn.LayerNorm(h)
        self.qkv, self.proj = nn.Linear(h, 3 * h), nn.Linear(h, h)
        self.fc1, self.fc2 = nn.Linear(h, f), nn.Linear(f, h)

    def forward(self, x):
        q, k, v = self.qkv(self.ln1(x)).chunk(3, dim=-1)
        x = x + self.proj(attention(q, k, v, self.a, self.a))
        return x + self.fc2(nn.functional.gelu(self.fc1(self.ln2(x))))


class LlamaBlock(nn.Module):
    """Llama layer: RMSNorm, bias-free GQA projections (K and V of width h*g/a), SwiGLU MLP."""

    def __init__(self, h: int, a: int, g: int, f: int):
        super().__init__()
        self.a, self.g = a, g
        kv = h * g // a
        self.norm1, self.norm2 = RMSNorm(h), RMSNorm(h)
        self.q, self.k, self.v = nn.Linear(h, h, bias=False), nn.Linear(h, kv, bias=False), nn.Linear(h, kv, bias=False)
        self.o = nn.Linear(h, h, bias=False)
        self.gate, self.up = nn.Linear(h, f, bias=False), nn.Linear(h, f, bias=False)
        self.down = nn.Linear(f, h, bias=False)

    def forward(self, x):
        y = self.norm1(x)
        x = x + self.o(attention(self.q(y), self.k(y), self.v(y), self.a, self.g))
        y = self.norm2(x)
        return x + self.down(nn.functional.silu(self.gate(y)) * self.up(y))


class GPT(nn.Module):
    """Whole GPT: word and learned position embeddings, L blocks, final LayerNorm, tied head."""

    def __init__(self, L: int, h: int, a: int, f: int, V: int, s: int):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(V, h), nn.Embedding(s, h)
        self.blocks = nn.ModuleList(GPTBlock(h, a, f) for _ in range(L))
        self.ln_f = nn.LayerNorm(h)
        self.head = nn.Linear(h, V, bias=False)
        self.head.weight = self.wte.weight  # tied


def block_for(model) -> nn.Module:
    """The reference block of a catalog model, built on the meta device (allocates nothing)."""
    with torch.device("meta"):
        if model.activation == "swiglu":
            return LlamaBlock(model.hidden_size, model.num_attention_heads, model.num_kv_heads,
                              model.ffn_hidden_size)
        return GPTBlock(model.hidden_size, model.num_attention_heads, model.ffn_hidden_size)


def count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())  # parameters() skips the tied duplicate


UNIT_PLAN = {"b": 1.0, "s": 1.0, "t": 1.0, "d": 1.0, "L_st": 1.0}
"""Plan symbols that divide (t, d) must not default to 0."""


def layer_values(model, **plan) -> dict[str, float]:
    """Compiled per-device costs of one layer of `model`."""
    return compiled_costs()({**model_values(model), **UNIT_PLAN, **plan})


GPT_MODELS = ["gpt-debug", "gpt3-125m", "gpt3-175b", "megatron-gpt-22b", "megatron-gpt-1t", "opt-66b"]
LLAMA_MODELS = ["llama-debug", "llama-2-7b", "llama-3-8b", "llama-3-70b", "llama-3.1-405b", "mistral-7b"]


# --- parameters -------------------------------------------------------------------------------

@pytest.mark.parametrize("name", GPT_MODELS + LLAMA_MODELS)
def test_layer_params_equal_the_real_module(name):
    model = load_model(name)
    llama = name in LLAMA_MODELS
    assert (model.norm, model.bias) == (("rmsnorm", False) if llama else ("layernorm", True))
    analytic = float(layer_values(model)["layer_params"])
    assert analytic == count(block_for(model))


def test_gpt3_175b_and_llama3_70b_layer_sizes():
    # Published shapes: 12h^2 + 13h for GPT-3 (Narayanan); 70B's GQA layer is 855,654,400.
    h = 12288
    assert float(layer_values(load_model("gpt3-175b"))["layer_params"]) == 12 * h**2 + 13 * h
    assert float(layer_values(load_model("llama-3-70b"))["layer_params"]) == 855_654_400


@pytest.mark.parametrize("name", ["gpt-debug", "gpt3-1.3b", "megatron-gpt-22b", "gpt3-175b"])
def test_whole_gpt_matches_narayanan_and_the_real_module(name):
    m = load_model(name)
    L, h, V, s = m.num_layers, m.hidden_size, m.vocab_size, m.seq_length
    narayanan = 12 * L * h**2 * (1 + 13 / (12 * h) + (V + s) / (12 * L * h))
    final_norm = 2 * h  # LayerNorm weight and bias, which Narayanan's count leaves out
    with torch.device("meta"):
        real = count(GPT(L, h, m.num_attention_heads, m.ffn_hidden_size, V, s))
    assert real == round(narayanan) + final_norm

    cluster = load_cluster("1xa100-80gb")
    costs = TrainingCostModel(m, load_plan({"global_batch_size": 1}), cluster)
    assert costs.stage_params(L, first=True, last=True) == pytest.approx(real, rel=1e-12)

    # pp = 4: the stages hold every layer once, plus Megatron's tied LM-head copy on the last.
    plan = load_plan({"pp": 4, "global_batch_size": 4})
    costs = TrainingCostModel(m, plan, cluster)
    layers = plan.stage_layers(m)
    total = sum(costs.stage_params(n, first=i == 0, last=i == 3) for i, n in enumerate(layers))
    assert total == pytest.approx(real + V * h, rel=1e-12)


def test_stage_params_are_per_tensor_parallel_shard():
    m = load_model("megatron-gpt-22b")
    cluster = load_cluster("8xa100-80gb")
    whole = TrainingCostModel(m, load_plan({"global_batch_size": 1}), cluster)
    shard = TrainingCostModel(m, load_plan({"tp": 8, "global_batch_size": 1}), cluster)
    for first, last in ((True, False), (False, True), (True, True), (False, False)):
        assert 8 * shard.stage_params(6, first, last) == pytest.approx(
            whole.stage_params(6, first, last), rel=1e-12)


# --- FLOPs ------------------------------------------------------------------------------------

@pytest.mark.parametrize("block,b,s", [
    (dict(h=64, a=4, f=256), 2, 16),
    (dict(h=96, a=6, f=384), 3, 24),
    (dict(h=64, a=8, g=2, f=176), 2, 16),  # GQA + SwiGLU
    (dict(h=64, a=4, g=4, f=160), 1, 32),  # Llama without GQA
])
def test_layer_forward_flops_equal_flop_counter(block, b, s):
    llama = "g" in block
    module = LlamaBlock(**block) if llama else GPTBlock(**block)
    x = torch.randn(b, s, block["h"])
    with FlopCounterMode(display=False) as counter:
        module(x)
    values = {"h": block["h"], "a": block["a"], "g": block.get("g", block["a"]), "f": block["f"],
              "n_mlp": 3 if llama else 2, "b": b, "s": s}
    for t in (1, 2):  # per-device FLOPs x t is the whole layer's
        layer = compiled_costs()({**UNIT_PLAN, **values, "t": t})
        analytic = t * float(layer["gemm_flops_fwd"] + layer["attention_flops_fwd"])
        assert analytic == counter.get_total_flops()
        assert t * float(layer["layer_flops_fwd"]) == analytic


@pytest.mark.parametrize("plan", [
    {"tp": 8, "global_batch_size": 8},
    {"tp": 2, "pp": 2, "dp": 2, "micro_batch_size": 2, "global_batch_size": 16},
    {"tp": 8, "global_batch_size": 8, "recompute": "full"},  # model FLOPs ignore recompute
])
def test_model_flops_equal_korthikanti(plan):
    m = load_model("megatron-gpt-22b")
    assert m.tied_embeddings
    report = simulate_training(m, "8xa100-80gb", plan)
    B, s, L, h, V = plan["global_batch_size"], m.seq_length, m.num_layers, m.hidden_size, m.vocab_size
    korthikanti = 72 * B * s * L * h**2 * (1 + s / (6 * h) + V / (12 * L * h))
    assert report.model_flops_per_iteration == pytest.approx(korthikanti, rel=1e-9)


# --- activation memory (Korthikanti et al., Sec. 4) -------------------------------------------

GPT_SHAPE = {S.g: S.a, S.f: 4 * S.h, S.n_mlp: 2, S.dropout: 1, S.flash: 0}


def gpt_activation(sp_on: int, selective: int, expr=layer_activation_bytes):
    return expr.subs({**GPT_SHAPE, S.sq: sp_on, S.sel: selective})


def assert_same(expr, reference):
    assert sp.simplify(expr - reference) == 0, (sp.factor(expr), reference)


def test_activation_bytes_follow_korthikanti_equations():
    s, b, h, a, t = S.s, S.b, S.h, S.a, S.t
    assert_same(gpt_activation(0, 0), s * b * h * (10 + 24 / t + 5 * a * s / (h * t)))  # Eq. 2
    assert_same(gpt_activation(1, 0), s * b * h * (34 + 5 * a * s / h) / t)  # Eq. 4
    assert_same(gpt_activation(1, 1), 34 * s * b * h / t)  # Eq. 5 (SP + selective)
    assert_same(gpt_activation(0, 0).subs(t, 1), s * b * h * (34 + 5 * a * s / h))  # Eq. 1
    # Full recompute keeps each layer's input: 2sbh, divided by t with sequence parallel.
    assert_same(checkpoint_activation_bytes.subs(S.sq, 0), 2 * s * b * h)
    assert_same(checkpoint_activation_bytes.subs(S.sq, 1), 2 * s * b * h / t)
    full = stage_activation_bytes.subs({**GPT_SHAPE, S.sq: 0, S.sel: 0, S.k: S.L_st})
    assert_same(full, S.L_st * 2 * s * b * h)
    # FlashAttention removes exactly the 5as^2b/t term.
    no_core = layer_activation_bytes.subs({**GPT_SHAPE, S.flash: 1, S.sq: 0, S.sel: 0})
    assert_same(no_core, s * b * h * (10 + 24 / t))


@pytest.mark.parametrize("tp,seq_par,recompute", [
    (1, False, "none"), (8, False, "none"), (4, True, "none"), (8, True, "selective"),
    (2, False, "full"), (8, True, "full"),
])
def test_stage_activations_numeric_in_simulation(tp, seq_par, recompute):
    """End to end: pp = 1 holds one micro-batch, so stage 0's activations are L x the equation."""
    m = load_model("megatron-gpt-22b")
    b = 2
    plan = {"tp": tp, "dp": 8 // tp, "micro_batch_size": b, "global_batch_size": b * 8 // tp,
            "sequence_parallel": seq_par, "recompute": recompute, "flash_attention": False}
    got = simulate_training(m, "8xa100-80gb", plan).stages[0].memory["activations"]
    s, h, a, L, t = m.seq_length, m.hidden_size, m.num_attention_heads, m.num_layers, tp
    if recompute == "full":
        per_layer = 2 * s * b * h / (t if seq_par else 1)
    elif seq_par and recompute == "selective":
        per_layer = 34 * s * b * h / t
    elif seq_par:
        per_layer = s * b * h * (34 + 5 * a * s / h) / t
    else:
        per_layer = s * b * h * (10 + 24 / t + 5 * a * s / (h * t))
    assert got == pytest.approx(L * per_layer, rel=1e-12)
