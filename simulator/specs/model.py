"""Transformer model spec: the published shape of a GPT- or Llama-style decoder."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, model_validator

from simulator.specs.base import Spec

MAX_LAYERS = 10_000


class TransformerSpec(Spec):
    """A decoder-only transformer.

    `gpt` style: LayerNorm with bias, biased linears, learned position embeddings, GELU MLP.
    `llama` style: RMSNorm, no biases, rotary positions, SwiGLU MLP, optional GQA.
    """

    kind: ClassVar[str] = "model"
    name: str
    # The simulator builds every layer of every stage: 10,000 keeps a run bounded (the largest
    # published models have a few hundred)
    num_layers: int = Field(ge=1, le=MAX_LAYERS)
    hidden_size: int = Field(ge=1)
    num_attention_heads: int = Field(ge=1)
    num_kv_heads: int | None = Field(default=None, ge=1)
    ffn_hidden_size: int | None = Field(default=None, ge=1)
    vocab_size: int = Field(ge=1)
    seq_length: int = Field(ge=1)
    activation: Literal["gelu", "relu", "swiglu"] = "gelu"
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    bias: bool = True
    position_embedding: Literal["learned", "rope", "alibi"] = "learned"
    # RoPE base frequency; None: not published here (engines then use RoFormer's 10000)
    rope_theta: float | None = Field(default=None, gt=0)
    # Llama-3.1-style RoPE frequency scaling (Dubey et al. 2024, arXiv 2407.21783): 8 for
    # Llama 3.1, 32 for Llama 3.2; None: no scaling
    rope_scaling_factor: float | None = Field(default=None, gt=1)
    tied_embeddings: bool = True
    dropout: bool = True
    source: str | None = None

    @model_validator(mode="after")
    def _shape(self):
        if self.num_kv_heads is None:
            object.__setattr__(self, "num_kv_heads", self.num_attention_heads)
        if self.ffn_hidden_size is None:
            object.__setattr__(self, "ffn_hidden_size", 4 * self.hidden_size)
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size: must be divisible by num_attention_heads = {self.num_attention_heads}"
            )
        for name in ("rope_theta", "rope_scaling_factor"):
            if getattr(self, name) is not None and self.position_embedding != "rope":
                raise ValueError(f"{name}: only for position_embedding 'rope', not "
                                 f"{self.position_embedding!r}")
        if self.num_attention_heads % self.num_kv_heads:
            raise ValueError(
                f"num_kv_heads: must divide num_attention_heads = {self.num_attention_heads}"
            )
        return self

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def mlp_matrices(self) -> int:
        """Number of h x f weight matrices in the MLP: 3 for SwiGLU, 2 for GELU."""
        return 3 if self.activation == "swiglu" else 2

    @property
    def gemms_per_layer(self) -> int:
        """GEMM calls of one layer's forward: Q, K, V, the output projection and the MLP."""
        return 4 + self.mlp_matrices
