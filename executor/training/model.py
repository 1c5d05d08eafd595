"""A real torch decoder built from a `TransformerSpec`: GPT- and Llama-style blocks.

The blocks run exactly the operations the simulator's layer model counts
(`simulator/costs/transformer.py`): separate Q, K, V and output projections, causal
`scaled_dot_product_attention`, a GELU or SwiGLU MLP, two norms and two residual adds, in
eager PyTorch (one kernel per op). GPT blocks use LayerNorm with biased linears and
dropout; Llama blocks use RMSNorm, no biases, rotary positions on Q and K, and grouped-query
attention. `tests/test_training_model.py` checks the parameter count against the
simulator's symbolic count, so a shape mismatch between the two cannot go unnoticed.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from simulator.specs.model import TransformerSpec


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def rope_tables(seq: int, head_dim: int, theta: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotary angles, [seq, head_dim / 2] (Su et al. 2021, RoFormer)."""
    inv = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(seq, dtype=torch.float32), inv)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x1, x2) of the head dimension of x [b, heads, s, d] (half-split layout)."""
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class Block(nn.Module):
    """One decoder layer of `spec`: norm -> attention -> add, norm -> MLP -> add."""

    def __init__(self, spec: TransformerSpec, dropout_p: float = 0.1):
        super().__init__()
        h, a, kv = spec.hidden_size, spec.num_attention_heads, spec.num_kv_heads
        self.heads, self.kv_heads, self.head_dim = a, kv, h // a
        self.rope = spec.position_embedding == "rope"
        self.dropout_p = dropout_p if spec.dropout else 0.0
        bias = spec.bias
        norm = (lambda: nn.LayerNorm(h)) if spec.norm == "layernorm" else (lambda: RMSNorm(h))
        self.norm1, self.norm2 = norm(), norm()
        self.q = nn.Linear(h, h, bias=bias)
        self.k = nn.Linear(h, kv * self.head_dim, bias=bias)
        self.v = nn.Linear(h, kv * self.head_dim, bias=bias)
        self.o = nn.Linear(h, h, bias=bias)
        f = spec.ffn_hidden_size
        self.swiglu = spec.activation == "swiglu"
        self.up = nn.Linear(h, f, bias=bias)
        self.gate = nn.Linear(h, f, bias=bias) if self.swiglu else None
        self.down = nn.Linear(f, h, bias=bias)
        self.act = {"gelu": F.gelu, "relu": F.relu, "swiglu": F.silu}[spec.activation]
        self._rope_cache: dict[tuple[int, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}

    def _heads(self, x: torch.Tensor, n: int) -> torch.Tensor:
        b, s, _ = x.shape
        return x.view(b, s, n, self.head_dim).transpose(1, 2)

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        b, s, h = x.shape
        q, k, v = self._heads(self.q(x), self.heads), self._heads(self.k(x), self.kv_heads), self._heads(self.v(x), self.kv_heads)
        if self.rope:
            if (s, x.device) not in self._rope_cache:
                self._rope_cache[s, x.device] = tuple(t.to(x.device) for t in rope_tables(s, self.head_dim))
            cos, sin = self._rope_cache[s, x.device]
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        # no dropout on the attention probabilities: it would force SDPA off its fused (flash)
        # kernel onto the materialized s x s path, on CPUs as on GPUs
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.kv_heads != self.heads)
        # -1, not h: under tensor parallelism this rank holds only its heads
        return self.o(out.transpose(1, 2).reshape(b, s, -1))

    def mlp(self, x: torch.Tensor) -> torch.Tensor:
        up = self.up(x)
        hidden = self.act(self.gate(x)) * up if self.swiglu else self.act(up)
        return self.down(hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        drop = self.dropout_p if self.training else 0.0
        x = x + F.dropout(self.attention(self.norm1(x)), drop, self.training)
        return x + F.dropout(self.mlp(self.norm2(x)), drop, self.training)


class Decoder(nn.Module):
    """Embedding (+ learned positions), `layers` blocks, final norm and LM head of `spec`."""

    def __init__(self, spec: TransformerSpec, layers: int | None = None):
        super().__init__()
        h = spec.hidden_size
        self.embed = nn.Embedding(spec.vocab_size, h)
        self.pos = nn.Embedding(spec.seq_length, h) if spec.position_embedding == "learned" else None
        self.blocks = nn.ModuleList(Block(spec) for _ in range(layers or spec.num_layers))
        self.norm = nn.LayerNorm(h) if spec.norm == "layernorm" else RMSNorm(h)
        self.head = nn.Linear(h, spec.vocab_size, bias=False)
        if spec.tied_embeddings:
            self.head.weight = self.embed.weight
        for p in self.parameters():
            if p.dim() == 2:
                nn.init.normal_(p, std=1.0 / math.sqrt(p.shape[1]))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        if self.pos is not None:
            x = x + self.pos(torch.arange(tokens.shape[1], device=tokens.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))
