"""GEMMs: the matrix multiplies of a transformer layer, at the shapes the catalog models produce.

Shapes come from the models, not a grid: for each catalog model, tensor-parallel degree t
(1, 2, 4, 8 where it divides the heads, the KV heads and the MLP width) and token count,
the layer's four weight matrices (per rank)

    QKV          h -> (h + 2 kv_dim) / t      attention out   h / t -> h
    MLP up       h -> f / t (SwiGLU's gate and up, unfused) and h -> 2 f / t (fused),
                 or h -> f / t for GELU       MLP down        f / t -> h

each in the three GEMMs of a training step: forward (m = tokens, n = out, k = in), grad input
(m = tokens, n = in, k = out) and grad weight (m = in, n = out, k = tokens). Duplicates
collapse; shapes above `max_flops` (a GEMM of ~0.3 s on one CPU core) are dropped, which is
what keeps the larger CPU models to their high TP degrees. Every GEMM is timed as
`torch.mm(a, b)` of row-major a (m, k) and b (k, n): the key has no layout, so one layout.

Cost model (fit per dtype, NNLS on relative error, GroupKFold over (m, n, k))
-------------------------------------------------------------------------------
    time = A flops + B flops / min(m, n, k) + C

A = 1 / flops_per_s is the core's (or GPU's) peak rate; B / A = `half_dim` is the smallest
dimension at which a GEMM reaches half of it (the saturation form `Efficiency` uses: the
packing, edge tiles and panel set-up of a blocked GEMM cost per output element more as the
blocks shrink); C = `overhead_s` is the dispatch and launch.

On the 2-core EPYC (Zen 5) VM, one thread, this reached a held-out median error of 5.5-5.7%
over the 552-row full sweep (fp32 4.4%, bf16 6.7%: ~90 and ~390 GFLOP/s, half_dim 8) and
3.9-5.4% over the 242-row quick one, so it needs no more terms, and the error reported is
that of the schema's own formula. The machine must be quiet: a quick run while other jobs
kept the load at ~2.5 gave 11%, a full run at load ~4 gave 20%. Tried and left out:
an operand-bytes term (NNLS gave it zero weight) and a term for outputs of 32 MiB or more,
which glibc maps fresh on each call so the GEMM pays their page faults (it moved the error
by 0.2 points, inside the run-to-run noise). The worst-fitted shapes are bf16 GEMMs with one
dimension of 128 (m = 128 runs slower than the model, k = 128 faster) and, for k = 128 with
large outputs, those page faults.

Decode GEMMs: weights streamed from memory
------------------------------------------
A decode step multiplies a few rows (one per sequence) by every weight of the model, which
together far exceed the caches, so its GEMMs are bound by streaming the weights from memory,
not by the FLOP rate above. The sweep adds such GEMMs: m = 1-32 rows against each of a
model's layer weights (TP 1) and its LM head (vocab x hidden). Each is timed as a decode
step meets it, cold: the call cycles through enough distinct copies of the weight
(COLD_BYTES, several times the last-level cache) that every call reads its weight from
memory, through the decoder's own `executor.serving.model._linear` (weight as the left
operand, rows padded), so the layout is the one a decode step runs: on a CPU core the
few-row GEMM's speed depends on it by up to 2x. Rows with m <= STREAM_MAX_ROWS are fitted apart (and left out of the fit above):

    time = weight_bytes / stream_bytes_per_s + flops / stream_flops_per_s + overhead

`stream_bytes_per_s` is what the serving model's weight reads use (`Efficiency.weight_stream`).

fp8 (CUDA only) runs through `torch._scaled_mm` with unit scales, bf16 output, on GPUs of
compute capability 8.9 or newer; elsewhere fp8 shapes are not swept.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import numpy as np
import pandas as pd
import torch

from profiler.context import ProfileContext
from profiler.fit import fit_linear, shape_groups
from simulator.specs.catalog import load_model
from simulator.specs.model import TransformerSpec

CPU_MODELS = ("gpt3-125m", "smollm2-135m", "llama-68m", "gpt3-350m", "llama-3.2-1b")
CPU_QUICK_MODELS = ("gpt3-125m", "smollm2-135m", "llama-3.2-1b")
CUDA_MODELS = ("llama-3-8b", "llama-3-70b", "gpt3-175b", "mistral-7b", "llama-3.1-405b")
CUDA_QUICK_MODELS = ("llama-3-8b", "llama-3-70b")
CPU_TOKENS = (128, 512, 2048)
CPU_QUICK_TOKENS = (128, 1024)
CUDA_TOKENS = (1024, 4096, 16384)
CUDA_QUICK_TOKENS = (2048, 8192)
TP_DEGREES = (1, 2, 4, 8)
CPU_MAX_FLOPS = 2.5e10  # ~0.3 s of fp32 on one core at ~90 GFLOP/s
CUDA_MAX_FLOPS = 1e14  # ~0.1 s at 1 PFLOP/s
CPU_QUICK_MAX_FLOPS = 5e9
ELEMENT_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "fp8": 1}
STREAM_ROWS = (1, 4, 16, 32)
STREAM_QUICK_ROWS = (1, 8, 32)
STREAM_MAX_ROWS = 32
COLD_BYTES = 256 * 2**20  # distinct weight copies a cold GEMM cycles through: past any cache
STREAM_MAX_WEIGHT_BYTES = 512 * 2**20


def stream_shapes(models: tuple[str, ...], rows: tuple[int, ...], max_flops: float) -> list[tuple[int, int, int]]:
    """(m, n, k) of decode GEMMs: m rows against each layer weight (TP 1) and the LM head,
    those of at most `max_flops` and STREAM_MAX_WEIGHT_BYTES of fp32 weight."""
    shapes: dict[tuple[int, int, int], None] = {}
    for name in models:
        model = load_model(name)
        for d_in, d_out in [*layer_matrices(model, 1), (model.hidden_size, model.vocab_size)]:
            for m in rows:
                if 2.0 * m * d_out * d_in <= max_flops and 4.0 * d_out * d_in <= STREAM_MAX_WEIGHT_BYTES:
                    shapes.setdefault((m, d_out, d_in))
    return list(shapes)


def layer_matrices(model: TransformerSpec, tp: int) -> list[tuple[int, int]]:
    """(in, out) of each weight matrix of one layer on one of `tp` ranks."""
    h, f = model.hidden_size, model.ffn_hidden_size
    kv_dim = model.num_kv_heads * model.head_dim
    mats = [(h, (h + 2 * kv_dim) // tp), (h // tp, h), (f // tp, h), (h, f // tp)]
    if model.activation == "swiglu":
        mats.append((h, 2 * f // tp))
    return mats


def tp_degrees(model: TransformerSpec) -> list[int]:
    """TP degrees whose split is even: heads, KV heads and the MLP width all divide."""
    return [t for t in TP_DEGREES if not (model.num_attention_heads % t or model.num_kv_heads % t
                                          or model.ffn_hidden_size % t)]


def training_gemms(tokens: int, d_in: int, d_out: int) -> list[tuple[int, int, int]]:
    """(m, n, k) of the forward, grad-input and grad-weight GEMMs of one linear layer."""
    return [(tokens, d_out, d_in), (tokens, d_in, d_out), (d_in, d_out, tokens)]


def model_shapes(models: tuple[str, ...], tokens: tuple[int, ...], max_flops: float) -> list[tuple[int, int, int]]:
    """Distinct (m, n, k) of `models` at `tokens`, in first-seen order, at most `max_flops` each."""
    shapes: dict[tuple[int, int, int], None] = {}
    for name in models:
        model = load_model(name)
        for tp in tp_degrees(model):
            for d_in, d_out in layer_matrices(model, tp):
                for t in tokens:
                    for mnk in training_gemms(t, d_in, d_out):
                        if 2 * np.prod(mnk, dtype=float) <= max_flops:
                            shapes.setdefault(mnk)
    return list(shapes)


def fp8_supported(ctx: ProfileContext) -> bool:
    return ctx.is_cuda and hasattr(torch, "_scaled_mm") and torch.cuda.get_device_capability(ctx.device) >= (8, 9)


def sweep(ctx: ProfileContext) -> list[dict]:
    if ctx.is_cuda:
        models, tokens = (CUDA_QUICK_MODELS, CUDA_QUICK_TOKENS) if ctx.quick else (CUDA_MODELS, CUDA_TOKENS)
        max_flops = CUDA_MAX_FLOPS
    else:
        models, tokens = (CPU_QUICK_MODELS, CPU_QUICK_TOKENS) if ctx.quick else (CPU_MODELS, CPU_TOKENS)
        max_flops = CPU_QUICK_MAX_FLOPS if ctx.quick else CPU_MAX_FLOPS
    dtypes = [d for d in ctx.dtypes if d != "fp8" or fp8_supported(ctx)]
    shapes = model_shapes(models, tokens, max_flops) + stream_shapes(models, STREAM_QUICK_ROWS if ctx.quick else STREAM_ROWS,
                                                              max_flops)
    return [{"m": m, "n": n, "k": k, "dtype": d} for m, n, k in shapes
            for d in dtypes if d != "fp8" or (m % 16 == 0 and n % 16 == 0 and k % 16 == 0)]


def values(shape: dict) -> dict:
    m, n, k = int(shape["m"]), int(shape["n"]), int(shape["k"])
    return {"flops": 2 * m * n * k, "bytes": (m * k + k * n + m * n) * ELEMENT_BYTES[shape["dtype"]]}


def _operation(ctx: ProfileContext, m: int, n: int, k: int, dtype: str):
    if dtype == "fp8":  # _scaled_mm wants a row-major and b column-major, both fp8, fp32 scales
        a = torch.randn(m, k, device=ctx.device).to(torch.float8_e4m3fn)
        b = torch.randn(n, k, device=ctx.device).to(torch.float8_e4m3fn).t()
        one = torch.ones((), device=ctx.device)
        return lambda: torch._scaled_mm(a, b, scale_a=one, scale_b=one, out_dtype=torch.bfloat16)
    a = torch.randn(m, k, device=ctx.device, dtype=ctx.torch_dtype(dtype))
    if m <= STREAM_MAX_ROWS:  # cold: a different copy of the weight on every call
        from executor.serving.model import _linear  # noqa: PLC0415 - the decoder's own GEMM

        copies = max(1, -(-COLD_BYTES // (k * n * ELEMENT_BYTES[dtype])))
        cold = [torch.randn(n, k, device=ctx.device, dtype=ctx.torch_dtype(dtype)) for _ in range(copies)]
        for w in cold:  # the decoder prepares a weight for few-row GEMMs once, on first use (bf16: a
            _linear(a, w)   # oneDNN blocked copy), and a served model's weights have been used: not timed
        weights = itertools.cycle(cold)
        return lambda: _linear(a, next(weights))
    b = torch.randn(k, n, device=ctx.device, dtype=ctx.torch_dtype(dtype))
    return lambda: torch.mm(a, b)


def measure(ctx: ProfileContext, shapes: list[dict]) -> Iterator[dict]:
    for shape in shapes:
        m, n, k = int(shape["m"]), int(shape["n"]), int(shape["k"])
        timing = ctx.timer.measure(_operation(ctx, m, n, k, shape["dtype"]))
        yield {"m": m, "n": n, "k": k, "dtype": shape["dtype"], **values(shape), **timing.row()}


def features(df: pd.DataFrame) -> pd.DataFrame:
    min_dim = df[["m", "n", "k"]].min(axis=1).astype(float)
    return pd.DataFrame({"flops": df["flops"].astype(float), "flops_per_min_dim": df["flops"] / min_dim,
                         "launch": 1.0}, index=df.index)


def stream_features(df: pd.DataFrame) -> pd.DataFrame:
    weight_bytes = df["n"] * df["k"] * df["dtype"].map(ELEMENT_BYTES)
    return pd.DataFrame({"weight_bytes": weight_bytes.astype(float), "flops": df["flops"].astype(float),
                         "launch": 1.0}, index=df.index)


def fit(df: pd.DataFrame, device_meta: dict) -> dict:
    out: dict = {}
    errors = []
    stream = df["m"] <= STREAM_MAX_ROWS
    for dtype, part in df[~stream].groupby("dtype", sort=False):
        lf = fit_linear(features(part), part["median_s"], shape_groups(part, ["m", "n", "k"]))
        a = lf.coef["flops"]
        out[str(dtype)] = {"flops_per_s": 1 / a if a > 0 else None,
                           "half_dim": lf.coef["flops_per_min_dim"] / a if a > 0 else None,
                           "overhead_s": lf.coef["launch"], **lf.summary()}
        errors.append(lf.cv_errors)
    for dtype, part in df[stream].groupby("dtype", sort=False):
        if str(dtype) not in out or len(part) < 3:
            continue
        lf = fit_linear(stream_features(part), part["median_s"], shape_groups(part, ["m", "n", "k"]))
        c = lf.coef
        out[str(dtype)]["stream"] = {"bytes_per_s": 1 / c["weight_bytes"] if c["weight_bytes"] > 0 else None,
                                     "flops_per_s": 1 / c["flops"] if c["flops"] > 0 else None,
                                     "overhead_s": c["launch"], **lf.summary()}
        errors.append(lf.cv_errors)
    pooled = np.concatenate(errors) if errors else np.array([])
    return {**out, "cv_median_abs_error": float(np.median(pooled)) if len(pooled) else None, "samples": len(df)}
