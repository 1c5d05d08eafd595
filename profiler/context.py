"""What every measurement needs to know: the device, dtypes, thread count, timer and sweep size.

Each op family is a module of `profiler/` with three functions, the only interface the
driver (`profiler/run.py`) relies on:

    sweep(ctx) -> list[dict]                 the shapes to measure (values of the table's key)
    measure(ctx, shapes) -> Iterator[dict]   one table row per shape, in order, as measured
    fit(df, device_meta) -> dict             fitted parameters + cv_median_abs_error + samples

`measure` yields rows one at a time so the driver can save after each (resumable) and move
the progress bar; families that pay a set-up cost once (spawning ranks, loading a model)
pay it once per call, not per shape.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from profiler.timers import Timer, quick_timer

CPU_DTYPES = ("fp32", "bf16")
CUDA_DTYPES = ("bf16", "fp16", "fp8")
TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class ProfileContext:
    device: str = "cpu"  # "cpu" or "cuda[:i]"
    quick: bool = False
    threads: int = 1
    ranks: tuple[int, ...] = (2,)
    dtypes: tuple[str, ...] = field(default=())
    timer: Timer | None = None

    def __post_init__(self) -> None:
        if not self.dtypes:
            object.__setattr__(self, "dtypes", CUDA_DTYPES if self.is_cuda else CPU_DTYPES)
        if self.timer is None:
            object.__setattr__(self, "timer", quick_timer(self.device, self.quick))

    @property
    def is_cuda(self) -> bool:
        return self.device.startswith("cuda")

    def torch_dtype(self, name: str) -> torch.dtype:
        if name == "fp8":
            return torch.float8_e4m3fn
        return TORCH_DTYPES[name]
