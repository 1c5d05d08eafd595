"""Copies: host-to-device and device-to-host (pageable and pinned host memory), device-to-device.

Each copy is `dst.copy_(src)` into a preallocated destination of `bytes` uint8 elements, so
the time is the transfer, not an allocation. A pinned host buffer is copied with
`non_blocking=True`, the way a data loader or an offloading optimizer overlaps it; the CUDA
events around it still time the DMA itself. Pageable copies stage through a driver buffer,
which is why they are measured apart.

On a CPU device there is no host link: the sweep is only "d2d", a memcpy between two
buffers of the same memory, pinned = False.

Fit per (direction, pinned): a line with a knee
-------------------------------------------------
    time = overhead_s + bytes / cached_bytes_per_s
           + max(bytes - cache_bytes, 0) * (1 / bytes_per_s - 1 / cached_bytes_per_s)

NNLS on relative error, GroupKFold over sizes, the knee `cache_bytes` chosen among the measured
sizes (or none) by the least squared relative error, so the held-out error is a little
optimistic about the knee. A host link is a plain line and gets no knee, or one with nothing
past it (`bytes_per_s` = `cached_bytes_per_s`). A CPU memcpy is not: on the 2-core EPYC VM it
ran at 40-75 GB/s while source and destination fit in the caches (up to 4 MiB) and at 8-20 GB/s
from 16 MiB up. One line through both missed by 30-65% (median, held out) and, weighted by
relative error, took its slope from the cached copies: 48 GB/s, five times too fast for the
large copies a simulated offload makes. With the knee: 24% on the full sweep (50 GB/s cached,
14.5 GB/s past 4 MiB), 52% on the quick sweep's four sizes. `bytes_per_s` is the rate past the
knee, what a large copy pays. Reported as {"h2d": ..., "h2d_pinned": ..., "d2h": ...,
"d2h_pinned": ..., "d2d": ...}, each with its cv_median_abs_error and samples.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import numpy as np
import pandas as pd
import torch

from profiler.context import ProfileContext
from profiler.fit import fit_linear, shape_groups

SIZES = tuple(65536 * 4**i for i in range(7))  # 64 KiB .. 256 MiB
QUICK_SIZES = tuple(65536 * 16**i for i in range(4))  # 64 KiB .. 256 MiB in four steps
CUDA_ROUTES = (("h2d", False), ("h2d", True), ("d2h", False), ("d2h", True), ("d2d", False))
CPU_ROUTES = (("d2d", False),)


def sweep(ctx: ProfileContext) -> list[dict]:
    routes = CUDA_ROUTES if ctx.is_cuda else CPU_ROUTES
    sizes = QUICK_SIZES if ctx.quick else SIZES
    return [{"direction": d, "pinned": p, "bytes": n} for (d, p), n in itertools.product(routes, sizes)]


def _buffers(ctx: ProfileContext, direction: str, pinned: bool, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    def host() -> torch.Tensor:
        return torch.empty(size, dtype=torch.uint8, pin_memory=pinned)

    def device() -> torch.Tensor:
        return torch.empty(size, dtype=torch.uint8, device=ctx.device)

    src, dst = {"h2d": (host, device), "d2h": (device, host), "d2d": (device, device)}[direction]
    a, b = src(), dst()
    a.fill_(1)
    b.fill_(0)  # touch every page now, so the timed copies do not fault them in
    return a, b


def measure(ctx: ProfileContext, shapes: list[dict]) -> Iterator[dict]:
    for shape in shapes:
        direction, pinned, size = shape["direction"], _bool(shape["pinned"]), int(shape["bytes"])
        src, dst = _buffers(ctx, direction, pinned, size)
        timing = ctx.timer.measure(lambda: dst.copy_(src, non_blocking=pinned))  # noqa: B023 - called at once
        yield {"direction": direction, "pinned": pinned, "bytes": size, **timing.row()}


def route(direction: str, pinned: bool) -> str:
    return f"{direction}_pinned" if pinned else direction


def features(size: pd.Series, knee: float | None) -> pd.DataFrame:
    size = size.astype(float)
    beyond = (size - knee).clip(lower=0.0) if knee is not None else 0.0 * size
    return pd.DataFrame({"bytes": size, "beyond_bytes": beyond, "launch": 1.0}, index=size.index)


def fit_route(part: pd.DataFrame) -> tuple[dict, np.ndarray]:
    """The knee (of at least two sizes past it) with the least squared relative error, and its fit."""
    sizes = np.sort(part["bytes"].unique()).astype(float)
    best = None
    for knee in [None, *sizes[1:-2]]:
        x = features(part["bytes"], knee)
        lf = fit_linear(x, part["median_s"], shape_groups(part, ["bytes"]))
        loss = float(np.sum((lf.predict(x) / part["median_s"].to_numpy(float) - 1.0) ** 2))
        if best is None or loss < best[0]:
            best = (loss, knee, lf)
    _, knee, lf = best
    c = lf.coef
    entry = {"bytes_per_s": _rate(c["bytes"] + c["beyond_bytes"]), "overhead_s": c["launch"],
             "cached_bytes_per_s": _rate(c["bytes"]), "cache_bytes": int(knee) if knee is not None and c["beyond_bytes"] > 0 else None}
    return {**entry, **lf.summary()}, lf.cv_errors


def fit(df: pd.DataFrame, device_meta: dict) -> dict:
    out: dict = {}
    errors = []
    for (direction, pinned), part in df.groupby(["direction", df["pinned"].map(_bool)], sort=False):
        out[route(direction, pinned)], cv = fit_route(part)
        errors.append(cv)
    pooled = np.concatenate(errors) if errors else np.array([])
    return {**out, "cv_median_abs_error": float(np.median(pooled)) if len(pooled) else None, "samples": len(df)}


def _rate(coef: float) -> float | None:
    return 1.0 / coef if coef > 0 else None


def _bool(value: object) -> bool:
    """`pinned` as read back from a CSV ("True"/"False") or as swept."""
    return value if isinstance(value, bool) else str(value).strip().lower() in ("true", "1")
