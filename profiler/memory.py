"""Memory-bound kernels as an eager model runs them: norms, softmax, activations, residual
adds, gating multiplies, the embedding gather and the optimizer step.

Every op is out of place, with its output allocated by torch on each call, as an eager
forward does; the inputs are made once per shape. `elements` is the size of the activation
(rows of `HIDDEN` for the row-wise ops, gathered rows of `HIDDEN` for the embedding) or the
parameter count (AdamW). `bytes` is the traffic an ideal kernel moves, element size e:

    layer_norm, rms_norm, softmax, gelu, silu   2 e elements  (read x, write y; weights ~0)
    add, mul                                    3 e elements  (read two, write one)
    embedding                                   2 e elements  (gathered rows read, written)
    adamw                                       7 e elements  (read param, grad, exp_avg,
                                                exp_avg_sq; write param, exp_avg, exp_avg_sq)

AdamW is `torch.optim.AdamW(fused=True)` where this torch has a fused kernel for the device
(one pass, which is what the 7 e count assumes), else `foreach=True`, whose several passes
show up as a lower effective bandwidth. Its states take the parameter's dtype, as torch keeps them.

Fit: time = bytes / bytes_per_s + fresh_bytes / fresh_bytes_per_s + overhead_s
---------------------------------------------------------------------------------
`fresh_bytes` is the output of an op whose output is too large for the allocator to reuse
memory it already has mapped: on a CPU, glibc serves allocations of 32 MiB and more
(its largest mmap threshold) with a fresh mmap and returns them on free, so every call
writes its output into pages the kernel must first fault in and zero. That costs more
than the kernel's own traffic: on the 2-core EPYC VM this was measured on, an out-of-place
add of 64 MiB fp32 outputs ran at ~3 GB/s of counted bytes while the same traffic into a
preallocated tensor (`copy_`) ran at ~20 GB/s. It is a real cost of eager PyTorch on a
CPU, so it is fitted, not avoided; on CUDA the caching allocator reuses blocks and the
feature is zero.

One rate per byte does not describe a CPU core, though: there these kernels are bound by
arithmetic per element far more than by bandwidth (bf16 elements are widened to fp32 for the
math, so a bf16 GELU moves half the bytes of an fp32 one in the same time), and a softmax
costs several times an add per byte. So the fit is reported at three levels, each with its
own held-out error: the top level's rates (one bytes_per_s / overhead_s for every op, the
schema's answer, poor on a CPU; its error is `single_rate_cv_median_abs_error`), `by_dtype`
(one rate per dtype over all ops: what the simulator's single memory-bound efficiency holds),
`by_op` (per op, both dtypes), and `by_op[op]["by_dtype"]` (per op and dtype, what a CPU
model should use; the family's `cv_median_abs_error` pools their held-out errors). Measured on the 2-core EPYC VM (one thread, other jobs sharing the machine), full
sweep: the top level missed by 42-50% (median, held out), the per-op-and-dtype fits by ~10%
(18% on the quick sweep's four sizes); bf16 rms_norm (a composite of several kernels with fp32
temporaries on the CPU) and the fp32 add, mul and embedding (60-100 GB/s while cache-resident,
~30 GB/s past L2) fit worst. Fresh pages cost ~1.6 GB/s of output in every op, a consistent
figure across ops, against 10-80 GB/s of ordinary traffic.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from profiler.context import ProfileContext
from profiler.fit import fit_linear, shape_groups

OPS = ("layer_norm", "rms_norm", "softmax", "gelu", "silu", "add", "mul", "embedding", "adamw")
TRAFFIC = {"add": 3, "mul": 3, "adamw": 7}  # elements moved per element; 2 for the others
HIDDEN = 1024  # row width of the row-wise ops and the embedding
VOCAB = 32000
CPU_ELEMENTS = tuple(4096 * 4**i for i in range(8))  # 4K .. 64M
CPU_QUICK_ELEMENTS = tuple(4096 * 8**i for i in range(4))  # 4K .. 2M
CUDA_ELEMENTS = tuple(65536 * 4**i for i in range(8))  # 64K .. 1G
CUDA_QUICK_ELEMENTS = tuple(65536 * 16**i for i in range(4))  # 64K .. 256M
FRESH_MIN_BYTES = 32 << 20  # glibc's largest mmap threshold: outputs this large are fresh pages
ELEMENT_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


def sweep(ctx: ProfileContext) -> list[dict]:
    sizes = (CUDA_QUICK_ELEMENTS if ctx.quick else CUDA_ELEMENTS) if ctx.is_cuda else (
        CPU_QUICK_ELEMENTS if ctx.quick else CPU_ELEMENTS)
    dtypes = [d for d in ctx.dtypes if d in ELEMENT_BYTES]
    return [{"op": op, "elements": n, "dtype": d} for op, d, n in itertools.product(OPS, dtypes, sizes)]


def traffic_bytes(op: str, elements: int, dtype: str) -> int:
    return TRAFFIC.get(op, 2) * elements * ELEMENT_BYTES[dtype]


def output_bytes(op: str, elements: int, dtype: str) -> int:
    """Bytes of the output torch allocates on each call (AdamW updates in place: none)."""
    return 0 if op == "adamw" else elements * ELEMENT_BYTES[dtype]


def _operation(ctx: ProfileContext, op: str, elements: int, dtype: str) -> Callable[[], object]:
    dt, dev = ctx.torch_dtype(dtype), ctx.device
    if op == "adamw":
        return _adamw_step(torch.randn(elements, device=dev, dtype=dt))
    if op == "embedding":
        table = torch.randn(VOCAB, HIDDEN, device=dev, dtype=dt)
        ids = torch.randint(0, VOCAB, (max(elements // HIDDEN, 1),), device=dev)
        return lambda: F.embedding(ids, table)
    x = torch.randn(max(elements // HIDDEN, 1), min(elements, HIDDEN), device=dev, dtype=dt)
    y, w, b = torch.randn_like(x), torch.ones(x.shape[-1], device=dev, dtype=dt), torch.zeros(x.shape[-1], device=dev, dtype=dt)
    return {
        "layer_norm": lambda: F.layer_norm(x, x.shape[-1:], w, b),
        "rms_norm": (lambda: F.rms_norm(x, x.shape[-1:], w)) if hasattr(F, "rms_norm")
        else (lambda: x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w),
        "softmax": lambda: torch.softmax(x, dim=-1),
        "gelu": lambda: F.gelu(x),
        "silu": lambda: F.silu(x),
        "add": lambda: x + y,
        "mul": lambda: x * y,
    }[op]


def _adamw_step(param: torch.Tensor) -> Callable[[], object]:
    p = torch.nn.Parameter(param)
    p.grad = torch.randn_like(param)
    try:
        opt = torch.optim.AdamW([p], lr=1e-4, fused=True)
        opt.step()  # a device or dtype without a fused kernel fails here, not at construction
    except (RuntimeError, ValueError):
        opt = torch.optim.AdamW([p], lr=1e-4, foreach=True)
    return opt.step


def measure(ctx: ProfileContext, shapes: list[dict]) -> Iterator[dict]:
    for shape in shapes:
        op, n, dtype = shape["op"], int(shape["elements"]), shape["dtype"]
        timing = ctx.timer.measure(_operation(ctx, op, n, dtype))
        yield {"op": op, "elements": n, "dtype": dtype, "bytes": traffic_bytes(op, n, dtype), **timing.row()}


def features(df: pd.DataFrame, device_meta: dict) -> pd.DataFrame:
    """bytes, fresh_bytes (outputs served by fresh pages: CPU only, 32 MiB and more) and launch."""
    out = np.array([output_bytes(o, int(n), d) for o, n, d in zip(df["op"], df["elements"], df["dtype"])], float)
    fresh = np.where((out >= FRESH_MIN_BYTES) & (device_meta.get("kind") != "cuda"), out, 0.0)
    return pd.DataFrame({"bytes": df["bytes"].astype(float), "fresh_bytes": fresh, "launch": 1.0}, index=df.index)


def _entry(x: pd.DataFrame, part: pd.DataFrame, group: list[str]) -> tuple[dict, np.ndarray]:
    lf = fit_linear(x.loc[part.index], part["median_s"], shape_groups(part, group))
    c = lf.coef
    return {"bytes_per_s": _rate(c["bytes"]), "fresh_bytes_per_s": _rate(c["fresh_bytes"]),
            "overhead_s": c["launch"], **lf.summary()}, lf.cv_errors


def fit(df: pd.DataFrame, device_meta: dict) -> dict:
    x = features(df, device_meta)
    top, _ = _entry(x, df, ["op", "elements"])
    by_op, fine_errors = {}, []
    for op, part in df.groupby("op", sort=False):
        by_op[str(op)], _ = _entry(x, part, ["elements"])
        by_dtype = {}
        for dtype, one in part.groupby("dtype", sort=False):
            by_dtype[str(dtype)], errors = _entry(x, one, ["elements"])
            fine_errors.append(errors)
        by_op[str(op)]["by_dtype"] = by_dtype
    by_dtype = {str(dtype): _entry(x, part, ["op", "elements"])[0] for dtype, part in df.groupby("dtype", sort=False)}
    pooled = np.concatenate(fine_errors) if fine_errors else np.array([])
    # The model a profile provides is the per-(op, dtype) one, so its pooled held-out error is
    # the family's; the single-rate fit (the top level's rates, and `by_dtype`, what the
    # simulator's one memory-bound efficiency can hold) keeps its own error beside it.
    return {**top, "single_rate_cv_median_abs_error": top["cv_median_abs_error"],
            "cv_median_abs_error": float(np.median(pooled)) if len(pooled) else None,
            "by_dtype": by_dtype, "by_op": by_op}


def _rate(coef: float) -> float | None:
    return 1.0 / coef if coef > 0 else None
