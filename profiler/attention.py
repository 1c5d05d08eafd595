"""Attention: `scaled_dot_product_attention` in prefill (causal) and decode (one query) form.

Head layouts come from the catalog models on one tensor-parallel rank (heads, KV heads,
head dim 64 or 128, grouped-query where KV heads < heads); batch and sequence are a grid,
less the shapes above the family's FLOP and byte caps. Q is (batch, heads, seq_q, head_dim)
and K, V are (batch, kv_heads, seq_kv, head_dim), passed with `enable_gqa=True` where this
torch has it; an older torch gets K and V repeated to all heads first, inside the timed call,
since that copy is what such a model pays (and its bytes are counted).

    prefill  seq_q = seq_kv = s, causal   flops = 4 b heads d s (s + 1) / 2
    decode   seq_q = 1, seq_kv = context  flops = 4 b heads d context
    bytes    Q and O of the queries, K and V of the keys: each read or written once

Decode with grouped-query attention packs the query heads of each K/V head along the query
axis (b, kv_heads, heads / kv_heads, d), as GQA-aware decode kernels and `executor.serving`'s
decoder do; the FLOPs and bytes are the same, the kernel is not (one query per head runs
SDPA's slow path on a CPU: ~2.5 GFLOP/s in bf16 against ~20 packed, SmolLM2's heads).

The flops count the two matmuls (QK^T and PV, 2 FLOPs per multiply-add) over the visible
(query, key) pairs only, as a causal flash kernel computes them; softmax is not counted.

Fit per dtype (NNLS on relative error, GroupKFold over the shape)
-----------------------------------------------------------------
    time = flops / flops_per_s + decode_flops / decode_flops_per_s
           + diagonal_keys * row_flops / flops_per_s + bytes / bytes_per_s + overhead_s

`flops` here are the prefill FLOPs; `decode_flops` those of decode rows. The two get their own
rates because they run different code: a prefill block of queries is a GEMM against each
key block, while one decode query is a matrix-vector product per head, which on a CPU core
cannot use the GEMM micro-kernels (bf16 decode ran at ~2.5 GFLOP/s here against ~50 for bf16
prefill). `row_flops` = 4 b heads d s is the cost of one more key for every query row: a blocked
causal kernel computes the whole diagonal block, about half a query block of keys per row more
than the triangle, so `diagonal_keys` (its coefficient over the prefill one) is that half block.
`bytes` is the Q, K, V, O traffic, which bounds decode once the KV cache leaves the caches.
The schema's flops_per_s / bytes_per_s / overhead_s keep their meaning; the two extra terms
are extra keys. On the 2-core EPYC VM (one thread, 180-row full sweep) the held-out median
error is 6-7% for bf16 and 17-20% for fp32 (10-12% pooled; prefill ~56 GFLOP/s in both
dtypes, decode 28 GFLOP/s in fp32 and 2.7 in bf16, ~50-65 diagonal keys); with only flops,
bytes and a constant it was 19% (fp32) and 30% (bf16). What is left in fp32 is the cache: a one-query fp32 decode runs at
~25 GFLOP/s while each head's K and V fit in L2 and at ~10 once they do not (b = 8-32,
context 4096), a step no term linear in FLOPs or bytes draws.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from profiler.context import ProfileContext
from profiler.fit import fit_linear, shape_groups
from simulator.specs.profile import TABLES

# (heads, kv_heads, head_dim) on one rank: gpt3-125m, smollm2-135m, llama-3.2-1b at TP 2,
# llama-3-8b at TP 4 and 8
CPU_HEADS = ((12, 12, 64), (9, 3, 64), (16, 4, 64), (8, 2, 128), (4, 1, 128))
CPU_QUICK_HEADS = ((12, 12, 64), (16, 4, 64), (4, 1, 128))
# llama-3-8b at TP 1 and 4, llama-3-70b at TP 8, gpt3-175b at TP 8
CUDA_HEADS = ((32, 8, 128), (8, 2, 128), (8, 1, 128), (12, 12, 128))
CUDA_QUICK_HEADS = ((32, 8, 128), (8, 1, 128))
GRIDS = {  # (prefill batches, prefill seqs, decode batches, decode contexts)
    ("cpu", False): ((1, 4), (96, 160, 256, 512, 704, 1024, 2048), (1, 8, 32), (256, 1024, 4096)),
    ("cpu", True): ((1, 2), (128, 512, 704, 1024), (1, 16), (512, 2048)),
    ("cuda", False): ((1, 4, 16), (1024, 2048, 4096, 8192, 16384), (1, 16, 64, 256), (1024, 4096, 16384, 32768)),
    ("cuda", True): ((1, 8), (2048, 8192), (16, 128), (4096, 16384)),
}
CPU_Q_BLOCK_STEPS = (192, 768)
"""Query lengths at which PyTorch's CPU flash kernel changes its query block: 32 rows below 192
queries, 64 below 768, 256 from there (aten/src/ATen/native/cpu/FlashAttentionKernel.cpp); the
prefill rows of the full CPU grid put two or more lengths in each regime, the quick grid one
or two."""
CAPS = {"cpu": (1e10, 1e9), "cuda": (2e13, 16e9)}  # (flops, bytes) of one call: ~0.3 s on a CPU core
ELEMENT_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
KEY = TABLES["attention"].key
GQA = "enable_gqa" in (F.scaled_dot_product_attention.__doc__ or "")


def values(shape: dict) -> dict:
    b, h, kv, d = (int(shape[c]) for c in ("batch", "heads", "kv_heads", "head_dim"))
    sq, skv = int(shape["seq_q"]), int(shape["seq_kv"])
    pairs = skv * (skv + 1) // 2 if shape["phase"] == "prefill" else sq * skv
    elements = b * d * (2 * h * sq + 2 * kv * skv)
    if not GQA and h != kv:  # the repeat writes K and V at all heads, and attention reads them back
        elements += 4 * b * h * skv * d
    return {"flops": 4 * b * h * d * pairs, "bytes": elements * ELEMENT_BYTES[shape["dtype"]]}


def sweep(ctx: ProfileContext) -> list[dict]:
    kind = "cuda" if ctx.is_cuda else "cpu"
    heads = (CUDA_QUICK_HEADS if ctx.quick else CUDA_HEADS) if ctx.is_cuda else (CPU_QUICK_HEADS if ctx.quick else CPU_HEADS)
    pre_b, pre_s, dec_b, dec_s = GRIDS[kind, ctx.quick]
    max_flops, max_bytes = CAPS[kind]
    shapes = []
    for (h, kv, d), dtype in itertools.product(heads, [t for t in ctx.dtypes if t in ELEMENT_BYTES]):
        base = {"heads": h, "kv_heads": kv, "head_dim": d, "dtype": dtype}
        shapes += [{"phase": "prefill", "batch": b, "seq_q": s, "seq_kv": s, **base}
                   for b, s in itertools.product(pre_b, pre_s)]
        shapes += [{"phase": "decode", "batch": b, "seq_q": 1, "seq_kv": s, **base}
                   for b, s in itertools.product(dec_b, dec_s)]
    return [{c: s[c] for c in KEY} for s in shapes
            if values(s)["flops"] <= max_flops and values(s)["bytes"] <= max_bytes]


def _operation(ctx: ProfileContext, shape: dict):
    b, h, kv, d = (int(shape[c]) for c in ("batch", "heads", "kv_heads", "head_dim"))
    dtype = ctx.torch_dtype(shape["dtype"])
    q = torch.randn(b, h, int(shape["seq_q"]), d, device=ctx.device, dtype=dtype)
    k = torch.randn(b, kv, int(shape["seq_kv"]), d, device=ctx.device, dtype=dtype)
    v = torch.randn_like(k)
    causal = shape["phase"] == "prefill"
    if not causal and h != kv and int(shape["seq_q"]) == 1:
        # decode as GQA-aware engines run it (FlashDecoding, vLLM's paged attention, our own
        # decoder): the h / kv query heads sharing a K/V head are packed along the query axis
        # and attend that head's cache once (several times faster on a CPU than one query per head)
        packed = q.view(b, kv, h // kv, d)
        return lambda: F.scaled_dot_product_attention(packed, k, v)
    if GQA:
        return lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=h != kv)
    return lambda: F.scaled_dot_product_attention(
        q, k.repeat_interleave(h // kv, dim=1), v.repeat_interleave(h // kv, dim=1), is_causal=causal)


def measure(ctx: ProfileContext, shapes: list[dict]) -> Iterator[dict]:
    for shape in shapes:
        timing = ctx.timer.measure(_operation(ctx, shape))
        yield {**{c: shape[c] for c in KEY}, **values(shape), **timing.row()}


def features(df: pd.DataFrame) -> pd.DataFrame:
    decode = (df["phase"] == "decode").to_numpy()
    flops = df["flops"].to_numpy(float)
    rows = 4.0 * df["batch"] * df["heads"] * df["head_dim"] * df["seq_q"]
    return pd.DataFrame({"flops": np.where(decode, 0.0, flops), "decode_flops": np.where(decode, flops, 0.0),
                         "row_flops": np.where(decode, 0.0, rows), "bytes": df["bytes"].astype(float),
                         "launch": 1.0}, index=df.index)


def fit(df: pd.DataFrame, device_meta: dict) -> dict:
    out: dict = {}
    errors = []
    for dtype, part in df.groupby("dtype", sort=False):
        lf = fit_linear(features(part), part["median_s"], shape_groups(part, [c for c in KEY if c != "dtype"]))
        c = lf.coef
        out[str(dtype)] = {"flops_per_s": _rate(c["flops"]), "bytes_per_s": _rate(c["bytes"]),
                           "overhead_s": c["launch"], "decode_flops_per_s": _rate(c["decode_flops"]),
                           "diagonal_keys": c["row_flops"] / c["flops"] if c["flops"] > 0 else None,
                           "prefill_curve": prefill_curve(part), **lf.summary()}
        if device_meta.get("kind") == "cpu":
            out[str(dtype)]["q_block_steps"] = list(CPU_Q_BLOCK_STEPS)
        errors.append(lf.cv_errors)
    pooled = np.concatenate(errors) if errors else np.array([])
    return {**out, "cv_median_abs_error": float(np.median(pooled)) if len(pooled) else None, "samples": len(df)}


def prefill_curve(part: pd.DataFrame) -> list[list[float]]:
    """[[sequence length, FLOP/s], ...]: the causal prefill rows' rate (visible pairs, as `flops`
    counts them) at each measured length, the median over head layouts and batches. The
    simulator reads it where a sequence length is known (`timing.attention_efficiency`): a CPU
    kernel's rate steps where its blocking changes, which the fit's one rate and diagonal
    cannot draw (bf16 on the 2-core EPYC VM: 37 GFLOP/s at 512 tokens, 45 at 704, 52 at 1024;
    the fit, 55 GFLOP/s with 45 diagonal keys, says 46, 48 and 50)."""
    pre = part[part["phase"] == "prefill"]
    rates = (pre["flops"] / pre["median_s"]).groupby(pre["seq_q"]).median()
    return [[float(seq), float(rate)] for seq, rate in rates.sort_index().items() if rate > 0]


def _rate(coef: float) -> float | None:
    """1 / coef: a rate the fit found; None where NNLS left the term at zero (never binding)."""
    return 1.0 / coef if coef > 0 else None
