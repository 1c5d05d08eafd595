"""The sympy symbols every cost expression is written in, and how a spec fills them.

Model shape: h hidden, a heads, g KV heads, f FFN width, V vocabulary, n_mlp (2 GELU/ReLU,
3 SwiGLU), bias/dropout/nb (norm parameters per norm, per hidden unit) as 0/1 indicators.
Plan: b micro-batch, s sequence, t/d tensor/data parallel, L_st layers in a stage or chunk,
k checkpointed layers, sp/sel/flash indicators, z1/z2/z3 "ZeRO stage >= n" indicators,
gb gradient bytes, o_w/o_g/o_o/o_a offload fractions, n_inflight micro-batches held.
"""

from __future__ import annotations

import sympy as sp

from simulator.specs.model import TransformerSpec
from simulator.specs.plan import TrainingPlan

h, a, g, f, V, n_mlp, bias, dropout, nb = sp.symbols("h a g f V n_mlp bias dropout nb", positive=True)
b, s, t, d, L_st, k = sp.symbols("b s t d L_st k", positive=True)
sq, sel, flash = sp.symbols("sq sel flash", nonnegative=True)  # sequence parallel (0/1) ...
z1, z2, z3, gb = sp.symbols("z1 z2 z3 gb", nonnegative=True)
o_w, o_g, o_o, o_a, n_inflight = sp.symbols("o_w o_g o_o o_a n_inflight", nonnegative=True)

MODEL_SYMBOLS = (h, a, g, f, V, n_mlp, bias, dropout, nb)
PLAN_SYMBOLS = (b, s, t, d, L_st, k, sq, sel, flash, z1, z2, z3, gb, o_w, o_g, o_o, o_a, n_inflight)
ALL_SYMBOLS = MODEL_SYMBOLS + PLAN_SYMBOLS

GRAD_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}


def model_values(model: TransformerSpec) -> dict[str, float]:
    """Symbol name -> value for the model's shape."""
    return {
        "h": model.hidden_size,
        "a": model.num_attention_heads,
        "g": model.num_kv_heads,
        "f": model.ffn_hidden_size,
        "V": model.vocab_size,
        "n_mlp": model.mlp_matrices,
        "bias": float(model.bias),
        "dropout": float(model.dropout),
        "nb": 2.0 if model.norm == "layernorm" else 1.0,
    }


def plan_values(plan: TrainingPlan, model: TransformerSpec) -> dict[str, float]:
    """Symbol name -> value for the plan's global settings (per-stage ones filled later)."""
    z = plan.zero_stage
    return {
        "b": plan.micro_batch_size,
        "s": plan.seq(model),
        "t": plan.tp,
        "d": plan.dp,
        "sq": float(plan.sequence_parallel),
        "sel": float(plan.recomputes_selectively),
        "flash": float(plan.flash_attention),
        "z1": float(z >= 1),
        "z2": float(z >= 2),
        "z3": float(z >= 3),
        "gb": GRAD_BYTES[plan.gradient_dtype],
        "o_w": plan.offload.weights,
        "o_g": plan.offload.gradients,
        "o_o": plan.offload.optimizer,
        "o_a": plan.offload.activations,
    }
