"""Measure a device into a profile directory, then fit it: what `simtune profile` runs.

The driver knows nothing about any op family beyond the three functions each module exports
(`profiler/context.py`): it asks every family for its sweep, drops the shapes the directory
already holds (so an interrupted run resumes where it stopped), measures the rest while
saving after every row, and finally refits every table into profile.json's `fits`.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol

import torch

from profiler.context import ProfileContext
from profiler.store import ProfileStore
from simulator.errors import SpecError
from simulator.specs.profile import OPS, load_profile, read_meta

MIN_ROWS_TO_FIT = 3


class Progress(Protocol):
    def start(self, totals: dict[str, int]) -> None: ...
    def advance(self, op: str) -> None: ...


class _Silent:
    def start(self, totals: dict[str, int]) -> None:
        pass

    def advance(self, op: str) -> None:
        pass


def op_module(op: str) -> ModuleType:
    if op not in OPS:
        raise SpecError("ops", op, f"unknown op family; choose from {', '.join(OPS)}")
    return importlib.import_module(f"profiler.{op}")


def parse_ops(text: str | Sequence[str] | None) -> tuple[str, ...]:
    """'gemm,attention' -> ('gemm', 'attention'); None or 'all' -> every family."""
    if text is None or text == "all":
        return OPS
    names = [n.strip() for n in (text.split(",") if isinstance(text, str) else text) if n.strip()]
    for name in names:
        if name not in OPS:
            raise SpecError("ops", name, f"unknown op family; choose from {', '.join(OPS)}")
    if not names:
        raise SpecError("ops", text, f"name at least one of {', '.join(OPS)}")
    return tuple(dict.fromkeys(names))


def check_device(device: str) -> str:
    if device == "cpu":
        return device
    if device == "cuda" or device.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise SpecError("device", device, "no CUDA device is visible to torch here; use --device cpu")
        return device
    raise SpecError("device", device, "must be cpu, cuda or cuda:<index>")


def run_profile(out: Path | str, device: str = "cpu", ops: Sequence[str] = OPS, ranks: Sequence[int] = (2,),
                quick: bool = False, threads: int | None = None, progress: Progress | None = None) -> Path:
    """Measure `ops` on `device` into `out` (resuming it), fit every table, return the directory."""
    device = check_device(device)
    if threads is None:
        threads = 1 if device == "cpu" else torch.get_num_threads()
    if threads < 1:
        raise SpecError("threads", threads, "must be >= 1")
    bad = [r for r in ranks if r < 2]
    if bad:
        raise SpecError("ranks", bad[0], "collectives need at least 2 ranks")
    torch.set_num_threads(threads)
    store = ProfileStore.open(Path(out), device, threads, ops)
    ctx = ProfileContext(device=device, quick=quick, threads=threads, ranks=tuple(ranks))
    progress = progress or _Silent()
    plan: list[tuple[str, ModuleType, list[dict[str, Any]]]] = []
    # in OPS order whatever the order asked: gnn, last, keeps freed memory in this process from
    # then on (as the executor's ranks do), which the other families must not measure under
    for op in sorted(ops, key=OPS.index):
        module, table = op_module(op), store.table(op)
        plan.append((op, module, [s for s in module.sweep(ctx) if not table.has(s)]))
    progress.start({op: len(todo) for op, _, todo in plan})
    for op, module, todo in plan:
        if todo:
            table = store.table(op)
            for row in module.measure(ctx, todo):
                table.add(row)
                progress.advance(op)
    fit_profile(store.root)
    return store.root


def fit_tables(root: Path | str) -> dict[str, dict[str, Any]]:
    """Fit every measured table of a profile directory (families with too few rows are skipped)."""
    root = Path(root)
    meta = read_meta(root)
    profile = load_profile(root)
    fits: dict[str, dict[str, Any]] = {}
    for op in meta["tables"]:
        df = profile.frame(op)
        if len(df) >= MIN_ROWS_TO_FIT:
            fits[op] = op_module(op).fit(df, meta["device"])
    return fits


def fit_profile(root: Path | str) -> dict[str, dict[str, Any]]:
    """Refit a profile directory and store the fits in its profile.json."""
    root = Path(root)
    fits = fit_tables(root)
    store = ProfileStore(root, read_meta(root))
    store.meta["fits"] = fits
    store.save_meta()
    return fits
