"""One timer for every measurement: CUDA events on a GPU, a synchronized wall clock on a CPU.

A measurement runs the operation a few times to warm up (allocator, oneDNN/cuBLAS
heuristics, caches), then repeats it until it has `reps` samples or has spent `budget_s`,
whichever comes first (at least `min_reps`), and keeps the median and the spread.
The median, not the mean: one preempted repetition on a shared machine must not move it.

On CUDA each repetition is bracketed by its own pair of events on the current stream, and
the host synchronizes once at the end, so launch latency is hidden the way it is in a real
step. On the CPU, torch ops are synchronous, so `perf_counter` around the call is the
kernel time plus the dispatcher's overhead, which is exactly what an eager model pays.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True, slots=True)
class Timing:
    """Seconds of one operation: median over `reps` samples, and the 10th-90th percentile spread."""

    median_s: float
    p10_s: float
    p90_s: float
    reps: int

    @property
    def spread(self) -> float:
        """(p90 - p10) / median: a relative noise figure for the row."""
        return (self.p90_s - self.p10_s) / self.median_s if self.median_s > 0 else 0.0

    def row(self) -> dict[str, float | int]:
        return {"median_s": self.median_s, "p10_s": self.p10_s, "p90_s": self.p90_s, "reps": self.reps}

    @classmethod
    def of(cls, samples: list[float]) -> Timing:
        a = np.asarray(samples, dtype=float)
        return cls(float(np.median(a)), float(np.percentile(a, 10)), float(np.percentile(a, 90)), len(a))


@dataclass(frozen=True)
class Timer:
    """Times a zero-argument callable on `device` ("cpu" or "cuda[:i]")."""

    device: str = "cpu"
    warmup: int = 2
    reps: int = 10
    min_reps: int = 3
    budget_s: float = 1.0

    def __post_init__(self) -> None:
        if self.warmup < 0 or self.min_reps < 1 or self.reps < self.min_reps:
            raise ValueError(f"Timer(warmup={self.warmup}, min_reps={self.min_reps}, reps={self.reps}): "
                             "need warmup >= 0 and 1 <= min_reps <= reps")

    @property
    def is_cuda(self) -> bool:
        return self.device.startswith("cuda")

    def synchronize(self) -> None:
        if self.is_cuda:
            torch.cuda.synchronize(self.device)

    def measure(self, fn: Callable[[], object], setup: Callable[[], object] | None = None) -> Timing:
        """Samples of `fn`; `setup` (CPU only) runs before each one, untimed (e.g. a cache flush)."""
        for _ in range(self.warmup):
            fn()
        self.synchronize()
        return Timing.of(self._cuda_samples(fn) if self.is_cuda else self._wall_samples(fn, setup))

    def _wall_samples(self, fn: Callable[[], object], setup: Callable[[], object] | None = None) -> list[float]:
        samples: list[float] = []
        deadline = time.perf_counter() + self.budget_s
        while len(samples) < self.reps and (len(samples) < self.min_reps or time.perf_counter() < deadline):
            if setup is not None:
                setup()
            t0 = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - t0)
        return samples

    def _cuda_samples(self, fn: Callable[[], object]) -> list[float]:
        pairs = []
        deadline = time.perf_counter() + self.budget_s
        while len(pairs) < self.reps and (len(pairs) < self.min_reps or time.perf_counter() < deadline):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            pairs.append((start, end))
            if len(pairs) % 8 == 0:  # bound the queue so the deadline means something
                end.synchronize()
        self.synchronize()
        return [s.elapsed_time(e) * 1e-3 for s, e in pairs]


def quick_timer(device: str, quick: bool) -> Timer:
    """The profiler's default timer: fewer, shorter repetitions with --quick."""
    return Timer(device, warmup=1, reps=5, min_reps=3, budget_s=0.3) if quick else Timer(device)
