"""Collective benchmark: time all-reduce, all-gather, reduce-scatter, all-to-all and send/recv
across real ranks, and fit an alpha-beta model per (backend, collective, ranks).

Table `collectives` (key backend, collective, bytes, ranks; `simulator.specs.profile`).
Backend "nccl" on a GPU (rank r on cuda:r, so `ranks` <= the GPU count), "gloo" on the CPU
(ranks are processes of `ctx.threads` threads, over loopback TCP; more ranks than cores is
allowed and measures an oversubscribed machine).

What `bytes` means (nccl-tests' "size", so a row compares with its output directly):
- all_reduce:     the buffer each rank reduces in place;
- all_gather:     the gathered output each rank ends with (each contributes bytes / ranks);
- reduce_scatter: the input each rank contributes (each keeps a bytes / ranks shard);
- all_to_all:     each rank's send buffer (= its receive buffer), bytes / ranks to each peer;
- send_recv:      the message each rank sends to rank + 1 while it receives one from rank - 1.
Buffers are float32, split into `ranks` equal chunks, so the bytes moved are `bytes` rounded
down to a multiple of 4 * ranks (at most 0.4 % less at 4 KiB and 8 ranks); the row keeps the
requested size as its key.

How a shape is measured (why not `Timer.measure`): a collective takes as long as its slowest
rank, and ranks drift apart between calls, so every repetition starts after a barrier and
its time is the MAX over ranks of each rank's seconds (one all-reduce MAX per repetition,
outside the timed region). The timer settings are `ctx.timer`'s: `warmup` untimed calls
(at least one, since NCCL builds its communicators on the first call), then repetitions
until `reps`, stopping after `min_reps` once the summed maxima pass `budget_s`; the summed
maxima are the same on every rank, so all ranks agree on when to stop. A repetition is
timed with CUDA events on a GPU, as `Timer` does, and with `perf_counter` on the CPU (gloo
calls return when the data has arrived). Ranks are spawned once per (backend, ranks) group,
which measures all its shapes, so a group's rows arrive together.

Each row also keeps `mean_s`, the mean of the repetitions, and the fit reads it (the median
where an older table lacks it): a step that makes many calls spends their sum, whose
expectation is the mean. On a shared or virtual machine a blocking call's latency is
heavy-tailed (a descheduled rank): gloo's 4 KiB all-reduce on the 2-core development machine
has a median of 0.3-0.4 ms and a mean of 0.8-1.6 ms over 200 calls, and a decode step's 60 of
them add up to the mean. Messages up to `SMALL_BYTES` get at least `SMALL_REPS` repetitions,
so that the mean of a heavy tail settles (they take about a millisecond each).

The fit (`fit`), per (backend, collective, ranks), with `profiler.fit.fit_linear`:

    time = alpha_s + bytes / alg_bytes_per_s          (features "launch" = 1 and "bytes")
    bus_bytes_per_s = alg_bytes_per_s * factor(collective, ranks)

with the bus-bandwidth factors of NVIDIA nccl-tests, doc/PERFORMANCE.md ("Bus bandwidth"):
all_reduce 2(n-1)/n; all_gather, reduce_scatter and all_to_all (n-1)/n; send_recv 1. The
bus bandwidth is what a link must carry, so it compares across collectives and rank counts
with the link's peak (`simulator.costs.comm` uses the same convention). Held-out groups
are message sizes. The fit is {backend: {collective: {"<ranks>": {alpha_s, bus_bytes_per_s,
alg_bytes_per_s, cv_median_abs_error, samples}}}, cv_median_abs_error (pooled over every
held-out row), samples}; a bandwidth too high to resolve (no byte term) is null.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist

from profiler.context import ProfileContext
from profiler.ranks import run_ranks
from profiler.timers import Timer, Timing

if TYPE_CHECKING:
    import pandas as pd

COLLECTIVES = ("all_reduce", "all_gather", "reduce_scatter", "all_to_all", "send_recv")
KiB, MiB = 1024, 1024**2
FLOAT32_BYTES = 4
# the hang guard of one group: start-up plus a generous bound per shape, never a budget
GROUP_TIMEOUT_S, SHAPE_TIMEOUT_S = 120.0, 60.0
SMALL_BYTES, SMALL_REPS = 64 * KiB, 200

# torch >= 2.13 renamed the single-tensor forms; older releases only have the old names
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def bus_factor(collective: str, ranks: int) -> float:
    """bus bandwidth / algorithm bandwidth (nccl-tests doc/PERFORMANCE.md)."""
    n = int(ranks)
    if collective == "all_reduce":
        return 2 * (n - 1) / n
    if collective in ("all_gather", "reduce_scatter", "all_to_all"):
        return (n - 1) / n
    if collective == "send_recv":
        return 1.0
    raise ValueError(f"collective {collective!r}: allowed {', '.join(COLLECTIVES)}")


def message_sizes(quick: bool) -> list[int]:
    """4 KiB to 64 MiB in powers of 4; --quick stops at 4 MiB."""
    top = 4 * MiB if quick else 64 * MiB
    return [4 * KiB * 4**i for i in range(20) if 4 * KiB * 4**i <= top]


def sweep(ctx: ProfileContext) -> list[dict[str, Any]]:
    """Every collective at every message size, for each rank count in ctx.ranks."""
    backend = "nccl" if ctx.is_cuda else "gloo"
    for n in ctx.ranks:
        if n < 2:
            raise ValueError(f"ranks={n} in ctx.ranks {ctx.ranks}: a collective needs ranks >= 2")
    return [{"backend": backend, "collective": c, "bytes": b, "ranks": n}
            for n in ctx.ranks for c in COLLECTIVES for b in message_sizes(ctx.quick)]


def measure(ctx: ProfileContext, shapes: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """One row per shape, in input order: the key and `Timing.row()` of the per-repetition maxima."""
    shapes = list(shapes)
    groups: dict[tuple[str, int], list[int]] = {}
    for i, shape in enumerate(shapes):
        _check(ctx, shape)
        groups.setdefault((shape["backend"], int(shape["ranks"])), []).append(i)
    rows: dict[int, dict[str, Any]] = {}
    for i, shape in enumerate(shapes):
        if i not in rows:  # first shape of its group: spawn the group's ranks and measure it all
            backend, n = shape["backend"], int(shape["ranks"])
            members = groups[(backend, n)]
            work = [(shapes[j]["collective"], int(shapes[j]["bytes"])) for j in members]
            per_rank = run_ranks(_bench_rank, n, backend=backend, threads=ctx.threads,
                                 args=(work, ctx.timer),
                                 timeout_s=GROUP_TIMEOUT_S + SHAPE_TIMEOUT_S * len(work))
            for j, samples in zip(members, per_rank[0], strict=True):
                rows[j] = {**_key(shapes[j]), **Timing.of(samples).row(), "mean_s": float(np.mean(samples))}
        yield rows.pop(i)


def fit(df: pd.DataFrame, device_meta: dict[str, Any]) -> dict[str, Any]:
    """alpha-beta per (backend, collective, ranks); `device_meta` is unused (the fit is per backend)."""
    # imported here: every spawned rank imports this module, and none of them fits
    import pandas as pd

    from profiler.fit import fit_linear

    out: dict[str, Any] = {}
    errors: list[np.ndarray] = []
    samples = 0
    for (backend, collective, ranks), g in df.groupby(["backend", "collective", "ranks"], sort=True):
        nbytes = g["bytes"].to_numpy(float)
        seconds = g["mean_s"] if "mean_s" in g and g["mean_s"].notna().all() else g["median_s"]
        lf = fit_linear(pd.DataFrame({"launch": np.ones(len(g)), "bytes": nbytes}),
                        seconds.to_numpy(float), groups=nbytes)
        alg = 1.0 / lf.coef["bytes"] if lf.coef["bytes"] > 0 else None
        out.setdefault(backend, {}).setdefault(collective, {})[str(int(ranks))] = {
            "alpha_s": lf.coef["launch"],
            "bus_bytes_per_s": alg * bus_factor(collective, ranks) if alg else None,
            "alg_bytes_per_s": alg,
            **lf.summary(),
        }
        errors.append(lf.cv_errors)
        samples += lf.samples
    pooled = np.concatenate(errors) if errors else np.array([])
    return {**out, "cv_median_abs_error": float(np.median(pooled)) if len(pooled) else None,
            "samples": samples}


def _key(shape: dict[str, Any]) -> dict[str, Any]:
    return {"backend": shape["backend"], "collective": shape["collective"],
            "bytes": int(shape["bytes"]), "ranks": int(shape["ranks"])}


def _check(ctx: ProfileContext, shape: dict[str, Any]) -> None:
    backend = "nccl" if ctx.is_cuda else "gloo"
    if shape["backend"] != backend:
        raise ValueError(f"shape {shape}: backend {shape['backend']!r} cannot run on device "
                         f"{ctx.device!r}; allowed {backend!r}")
    if shape["collective"] not in COLLECTIVES:
        raise ValueError(f"shape {shape}: collective {shape['collective']!r}; allowed {', '.join(COLLECTIVES)}")
    if int(shape["ranks"]) < 2 or int(shape["bytes"]) < 1:
        raise ValueError(f"shape {shape}: need ranks >= 2 and bytes >= 1")


# ---- inside each rank (run by profiler.ranks.run_ranks) ----

def _bench_rank(rank: int, world_size: int, work: list[tuple[str, int]], timer: Timer) -> list[list[float]]:
    """Per shape, the per-repetition maxima over ranks (the same list on every rank)."""
    cuda = dist.get_backend() == "nccl"
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    return [_max_samples(_collective_op(c, b, rank, world_size, device), _timer_for(b, timer), device) for c, b in work]


def _timer_for(nbytes: int, timer: Timer) -> Timer:
    """Small messages: at least SMALL_REPS repetitions (their mean is the fit's)."""
    if nbytes > SMALL_BYTES or timer.reps >= SMALL_REPS:
        return timer
    return replace(timer, reps=SMALL_REPS, min_reps=max(timer.min_reps, SMALL_REPS))


def _collective_op(collective: str, nbytes: int, rank: int, n: int, device: torch.device) -> Callable[[], object]:
    """The collective on freshly allocated float32 buffers of `nbytes` (see the module docstring)."""
    chunk = max(1, nbytes // (FLOAT32_BYTES * n))
    full = torch.zeros(chunk * n, device=device)  # zeros: repeated sums stay finite
    if collective == "all_reduce":
        return lambda: dist.all_reduce(full)
    if collective == "all_gather":
        part = torch.zeros(chunk, device=device)
        return lambda: _all_gather(full, part)
    if collective == "reduce_scatter":
        part = torch.zeros(chunk, device=device)
        return lambda: _reduce_scatter(part, full)
    if collective == "all_to_all":
        received = torch.empty_like(full)
        return lambda: dist.all_to_all_single(received, full)
    if collective == "send_recv":
        received = torch.empty_like(full)
        # batched, so NCCL posts the send and the receive together (two ranks sending first
        # to each other on one stream would deadlock)
        ops = [dist.P2POp(dist.isend, full, (rank + 1) % n), dist.P2POp(dist.irecv, received, (rank - 1) % n)]
        return lambda: [w.wait() for w in dist.batch_isend_irecv(ops)]
    raise ValueError(f"collective {collective!r}: allowed {', '.join(COLLECTIVES)}")


def _max_samples(op: Callable[[], object], timer: Timer, device: torch.device) -> list[float]:
    cuda = device.type == "cuda"
    barrier_kw = {"device_ids": [device.index]} if cuda else {}
    for _ in range(max(1, timer.warmup)):
        op()
    samples: list[float] = []
    while len(samples) < timer.reps and (len(samples) < timer.min_reps or sum(samples) < timer.budget_s):
        dist.barrier(**barrier_kw)
        if cuda:
            torch.cuda.synchronize(device)
        worst = torch.tensor([_seconds(op, cuda)], dtype=torch.float64, device=device)
        dist.all_reduce(worst, op=dist.ReduceOp.MAX)
        samples.append(float(worst.item()))
    return samples


def _seconds(op: Callable[[], object], cuda: bool) -> float:
    if not cuda:
        t0 = time.perf_counter()
        op()
        return time.perf_counter() - t0
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    op()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1e-3
