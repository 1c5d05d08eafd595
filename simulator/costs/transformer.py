"""Symbolic per-layer costs of a decoder transformer: parameters, FLOPs, bytes, memory, comm.

All expressions are per device (one tensor-parallel shard) unless the name says otherwise,
in the symbols of `symbols.py`. Sources:
- FLOPs: count every GEMM (2 FLOPs per multiply-add), as Narayanan et al. SC'21 (arXiv
  2104.04473, Sec. 5.1) and PaLM (Chowdhery et al. 2022, App. B) do; the attention score
  and value products count the full s x s matrix (4*b*s^2*h per layer forward).
- Activation memory: Korthikanti et al. MLSys'23 (arXiv 2205.05198), Sec. 4, Eq. 1-6,
  generalized per tensor to GQA, SwiGLU and models without dropout.
- Model states: Rajbhandari et al. SC'20 (ZeRO, arXiv 1910.02054), Sec. 3 and 5, with the
  gradient width a plan option (Megatron-LM keeps fp32 main gradients: 18 bytes/param).
- Communication volumes: Megatron-LM TP (Shoeybi et al. 2019; Korthikanti Sec. 4.2.2 for
  sequence parallel), ZeRO (Rajbhandari et al., Sec. 7).
"""

from __future__ import annotations

import sympy as sp

from simulator.costs.symbols import (
    L_st,
    V,
    a,
    b,
    bias,
    d,
    dropout,
    f,
    flash,
    g,
    gb,
    h,
    k,
    n_inflight,
    n_mlp,
    nb,
    o_a,
    o_g,
    o_o,
    o_w,
    s,
    sel,
    sq,
    t,
    z1,
    z2,
    z3,
)

ACT_BYTES = 2  # 16-bit activations and weights
OPTIMIZER_BYTES = 12  # Adam: fp32 master weights, momentum, variance (ZeRO's K = 12)

# --- parameters --------------------------------------------------------------------------
kv_width = h * g / a  # width of K (and of V) under grouped-query attention

attention_weight_params = h * (h + 2 * kv_width) + h * h  # QKV and the output projection
layer_weight_params = attention_weight_params + n_mlp * h * f
layer_bias_params = bias * ((h + 2 * kv_width) + h + (n_mlp - 1) * f + h)
layer_norm_params = 2 * nb * h
layer_params = layer_weight_params + layer_bias_params + layer_norm_params
"""Parameters of one transformer layer (QKV, output projection, MLP, biases, two norms).
GPT-3 shapes give 12h^2 + 13h (Narayanan et al., Eq. for P)."""

embedding_params = V * h  # word embedding (learned positions add s*h, see model_params)

# --- FLOPs per layer, forward, one micro-batch, per device --------------------------------
gemm_flops_fwd = 2 * b * s * layer_weight_params / t
attention_flops_fwd = 4 * b * s**2 * h / t  # QK^T and softmax(QK^T)V, full s x s
layer_flops_fwd = gemm_flops_fwd + attention_flops_fwd
lm_head_flops_fwd = 2 * b * s * h * V / t
layer_flops_bwd = 2 * layer_flops_fwd
"""Backward = 2 x forward for every GEMM (input and weight gradients)."""

# --- memory-bound traffic per layer, forward, per device (bytes) --------------------------
_replicated = sq / t + (1 - sq)  # norms/dropout/residual run on s/t tokens under SP
elementwise_bytes_fwd = ACT_BYTES * b * s * (
    (4 + 2 + 6 * dropout) * h * _replicated  # 2 norms (r+w), residual adds, fused dropout-add
    + (2 * n_mlp - 2) * f / t  # activation function: GELU r+w, SwiGLU 2r+1w
)
"""Element-wise kernels of a layer outside the attention core, fused as Megatron-LM's kernels or
torch.compile run them (each tensor read and written once per fused chain)."""
eager_extra_bytes_fwd = b * s * (
    2 * 30 * h * _replicated  # 2 RMSNorms in fp32, op by op: cast, pow, mean, mul, cast, weight
    + 24 * (h + kv_width) / t  # RoPE on Q and K through fp32 complex views: cast, multiply, cast
    + 4 * (2 * h + 2 * kv_width) / t  # head-major copies of Q, K, V into attention and out of it
    + 2 * (n_mlp - 2) * f / t  # SwiGLU's separate product pass
)
"""HBM bytes a PyTorch-eager layer (one kernel per op: torchtitan without torch.compile) moves on
top of the fused count: each op of a norm, RoPE or gate reads and writes its whole tensor."""
attention_elementwise_bytes_fwd = (1 - flash) * ACT_BYTES * b * a * s**2 / t * (2 + 2.5 * dropout)
"""Softmax (r+w) and attention dropout (r+w+mask) on the s x s scores; FlashAttention fuses
them into its kernel."""

# --- activation memory per layer per micro-batch, per device (bytes) ----------------------
act_replicated = b * s * h * (4 + 4 + 2 * dropout)  # norm outputs x2, MLP/QKV inputs, masks
act_sharded = b * s * (
    2 * h + 4 * kv_width  # Q, K, V
    + 2 * h  # attention output (projection input)
    + 2 * (n_mlp - 1) * f  # activation-function inputs
    + 2 * f  # second MLP GEMM input
) / t
act_attention_core = (1 - flash) * b * a * s**2 * (2 + 3 * dropout) / t
layer_activation_bytes = act_replicated * _replicated + act_sharded + act_attention_core * (1 - sel)
"""Korthikanti Eq. 2: s*b*h*(10 + 24/t + 5*a*s/(h*t)) for GPT shapes without SP; Eq. 4:
s*b*h*(34 + 5*a*s/h)/t with SP; selective recompute drops the attention core (Eq. 5)."""
checkpoint_activation_bytes = ACT_BYTES * b * s * h * _replicated
"""Full recompute keeps only each layer's input (Korthikanti Sec. 5)."""

stage_activation_bytes = (L_st - k) * layer_activation_bytes + k * checkpoint_activation_bytes
"""Activations of one micro-batch held by a stage (or chunk) with k checkpointed layers."""
recompute_buffer_bytes = sp.Min(k, 1) * layer_activation_bytes
"""While a checkpointed layer is re-run in backward, its full activations live once."""

# --- model states per device (bytes) ------------------------------------------------------
def model_state_bytes(params, on_device: bool = True):
    """Weights (2 B), gradients (gb B) and Adam states (12 B) of `params` parameters held by one
    tensor-parallel shard, sharded over d by ZeRO stage (z1: optimizer, z2: + gradients,
    z3: + weights), on the device or (on_device=False) in host memory by the offloaded
    fractions. ZeRO-3 with gb = 2 gives 16*P/d on the device."""
    share = (lambda o: 1 - o) if on_device else (lambda o: o)
    weights = ACT_BYTES * params * (1 - z3 + z3 / d) * share(o_w)
    grads = gb * params * (1 - z2 + z2 / d) * share(o_g)
    optim = OPTIMIZER_BYTES * params * (1 - z1 + z1 / d) * share(o_o)
    return weights, grads, optim


stage_params = L_st * layer_params / t
stage_recompute_flops = k * layer_flops_fwd + sel * (L_st - k) * attention_flops_fwd
"""Forward work re-run in backward: whole checkpointed layers (full recompute), or only the
attention core of the others (selective recompute, Korthikanti Sec. 5)."""
ADAM_STEP_BYTES = 16 + 12  # read fp32 weight, momentum, variance, gradient; write them + 16-bit weight
optimizer_step_bytes = ADAM_STEP_BYTES * stage_params * (1 - z1 + z1 / d) * (1 - o_o)
"""HBM traffic of the device's Adam step over its (ZeRO-1+ sharded) optimizer states; the
offloaded fraction steps on the CPU instead."""
stage_weight_bytes, stage_grad_bytes, stage_optimizer_bytes = model_state_bytes(stage_params)
stage_host_state_bytes = sum(model_state_bytes(stage_params, on_device=False))
"""Offloaded model states, kept in the host memory that serves this device."""
stage_peak_bytes = (
    stage_weight_bytes + stage_grad_bytes + stage_optimizer_bytes
    + n_inflight * stage_activation_bytes * (1 - o_a) + recompute_buffer_bytes
)
"""Peak of a stage without embedding/LM head: model states + in-flight activations."""

# --- communication per layer per micro-batch, per device (bytes) --------------------------
tp_allreduce_bytes = ACT_BYTES * b * s * h
"""Each of the 2 forward and 2 backward TP all-reduces moves b*s*h 16-bit elements
(Megatron-LM); with SP each becomes a reduce-scatter + all-gather of the same volume."""
pp_p2p_bytes = ACT_BYTES * b * s * h / t
"""Activation (or gradient) crossing a stage boundary, scattered over the TP group."""
dp_grad_bytes = gb * stage_params
"""Gradients reduced across data parallel per stage per iteration."""
zero3_gather_bytes = ACT_BYTES * layer_params / t
"""ZeRO-3 / FSDP all-gathers one layer's 16-bit weights (this TP shard's, whole) per use."""
zero3_gather_bytes_fp8 = (layer_weight_params + ACT_BYTES * (layer_bias_params + layer_norm_params)) / t
"""The same with the GEMM weights gathered in fp8 (torchao's Float8 all-gather for FSDP2)."""
linear_input_elements_fwd = b * s * (2 * h + h / t + f / t)
"""Elements entering the linears of one layer on one device: QKV and MLP-up inputs are whole
(gathered under sequence parallel), the output projection and MLP-down inputs TP-sharded.
fp8 linears cast each of them (and each weight) before the GEMM."""
offload_bytes_per_microbatch = ACT_BYTES * stage_params * o_w + o_a * stage_activation_bytes
"""PCIe traffic per micro-batch: offloaded weights fetched for forward and backward, and
offloaded activations copied out after forward and back in before backward."""

# --- inference --------------------------------------------------------------------------
kv_bytes_per_token = 2 * ACT_BYTES * (h / a) * sp.Max(g / t, 1)
"""K and V of one token in one layer on one device: the KV heads are split over TP, and
replicated once TP exceeds them (Seesaw App. A: 4*h_kv*d bytes per token per layer)."""
layer_weight_bytes = ACT_BYTES * layer_weight_params / t
"""16-bit weights of one layer's GEMMs on one device: read once per decode step."""
attention_weight_bytes = ACT_BYTES * attention_weight_params / t
"""The attention part of `layer_weight_bytes` (QKV and output projection): an uneven TP split
shards it by GQA groups and the MLP by columns, each costed at its own largest shard."""

EXPRESSIONS: dict[str, sp.Expr] = {
    "layer_params": layer_params,
    "embedding_params": embedding_params,
    "gemm_flops_fwd": gemm_flops_fwd,
    "attention_flops_fwd": attention_flops_fwd,
    "layer_flops_fwd": layer_flops_fwd,
    "layer_flops_bwd": layer_flops_bwd,
    "stage_recompute_flops": stage_recompute_flops,
    "optimizer_step_bytes": optimizer_step_bytes,
    "lm_head_flops_fwd": lm_head_flops_fwd,
    "elementwise_bytes_fwd": elementwise_bytes_fwd,
    "eager_extra_bytes_fwd": eager_extra_bytes_fwd,
    "attention_elementwise_bytes_fwd": attention_elementwise_bytes_fwd,
    "layer_activation_bytes": layer_activation_bytes,
    "checkpoint_activation_bytes": checkpoint_activation_bytes,
    "stage_activation_bytes": stage_activation_bytes,
    "recompute_buffer_bytes": recompute_buffer_bytes,
    "stage_params": stage_params,
    "stage_weight_bytes": stage_weight_bytes,
    "stage_grad_bytes": stage_grad_bytes,
    "stage_optimizer_bytes": stage_optimizer_bytes,
    "stage_host_state_bytes": stage_host_state_bytes,
    "stage_peak_bytes": stage_peak_bytes,
    "tp_allreduce_bytes": tp_allreduce_bytes,
    "pp_p2p_bytes": pp_p2p_bytes,
    "dp_grad_bytes": dp_grad_bytes,
    "zero3_gather_bytes": zero3_gather_bytes,
    "zero3_gather_bytes_fp8": zero3_gather_bytes_fp8,
    "linear_input_elements_fwd": linear_input_elements_fwd,
    "offload_bytes_per_microbatch": offload_bytes_per_microbatch,
    "kv_bytes_per_token": kv_bytes_per_token,
    "layer_weight_bytes": layer_weight_bytes,
    "attention_weight_bytes": attention_weight_bytes,
}
