"""What a profile says: each fit's held-out error, and measured efficiency against the datasheet.

`fit_report` refits the tables (fits are cheap and the report should not trust a stale
profile.json) and returns the `simtune profile --report --json` object:
`{"profile", "device", "datasheet_device", "fits": {"<op>": {"cv_median_abs_error", "samples", ...}}}`.
`plot_efficiency` draws measured efficiency curves against the datasheet roofline.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from profiler.run import fit_tables
from simulator.specs.catalog import load_device
from simulator.specs.hardware import DeviceSpec
from simulator.specs.profile import catalog_device_of, load_profile


def datasheet_device(device_meta: dict[str, Any]) -> DeviceSpec | None:
    """The catalog device whose datasheet a profile of `device_meta` is compared with."""
    catalog = catalog_device_of(device_meta)
    return load_device(catalog) if catalog else None


def _summary(fit: dict[str, Any]) -> dict[str, Any]:
    """The fit's error and sample count, its own numbers, and each nested part (a dtype, a
    collective at a rank count ...) as one flat `parts` entry named by its path."""
    keep = {"cv_median_abs_error": fit.get("cv_median_abs_error"), "samples": fit.get("samples")}
    params = {k: v for k, v in fit.items() if k not in keep and isinstance(v, (int, float))}
    parts: dict[str, dict[str, float]] = {}

    def walk(node: dict[str, Any], path: str) -> None:
        numbers = {k: v for k, v in node.items() if isinstance(v, (int, float))}
        if numbers and path:
            parts[path] = numbers
        for k, v in node.items():
            if isinstance(v, dict):
                walk(v, f"{path}.{k}" if path else str(k))

    walk({k: v for k, v in fit.items() if isinstance(v, dict)}, "")
    return {**keep, **params, **({"parts": parts} if parts else {})}


def fit_report(root: Path | str) -> dict[str, Any]:
    profile = load_profile(root)
    fits = fit_tables(profile.root)
    sheet = datasheet_device(profile.device)
    return {
        "profile": str(profile.root), "device": profile.device,
        "datasheet_device": sheet.name if sheet else None,
        "tables": {op: entry.get("rows") for op, entry in profile.tables.items()},
        "fits": {op: _summary(fit) for op, fit in fits.items()},
    }


def _peak(sheet: DeviceSpec, dtype: str) -> float | None:
    tflops = sheet.peak_tflops.get(dtype)
    return tflops * 1e12 if tflops else None


def plot_efficiency(root: Path | str):
    """Measured efficiency vs the datasheet roofline, one panel per measured family."""
    import matplotlib.pyplot as plt  # noqa: PLC0415 - plotting only

    profile = load_profile(root)
    sheet = datasheet_device(profile.device)
    panels = [op for op in ("gemm", "attention", "memory", "copies", "collectives", "decode") if op in profile.tables]
    fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(4.2 * max(1, len(panels)), 3.6), squeeze=False)
    for ax, op in zip(axes[0], panels):
        df = profile.frame(op)
        PANELS[op](ax, df, sheet, profile.fits.get(op, {}))
    fig.suptitle(f"{profile.device.get('name')} ({profile.device.get('threads')} threads), {profile.label}", fontsize=9)
    fig.tight_layout()
    return fig


def _panel_gemm(ax, df: pd.DataFrame, sheet: DeviceSpec | None, fit: dict) -> None:
    d = np.minimum(np.minimum(df["m"], df["n"]), df["k"])
    for dtype, rows in df.groupby("dtype"):
        peak = _peak(sheet, dtype) if sheet else None
        rate = rows["flops"] / rows["median_s"]
        y = rate / peak if peak else rate / 1e12
        ax.scatter(d[rows.index], y, s=10, label=dtype)
        f = fit.get(dtype)
        if f and peak:
            grid = np.geomspace(max(1, d.min()), d.max(), 50)
            ax.plot(grid, f["flops_per_s"] * grid / (grid + f["half_dim"]) / peak, lw=1)
    ax.axhline(1.0, color="k", ls="--", lw=1, label="datasheet peak")
    ax.set(xscale="log", xlabel="smallest GEMM dimension", ylabel="achieved / datasheet peak" if sheet else "TFLOP/s",
           title="GEMM")
    ax.legend(fontsize=7)


def _panel_attention(ax, df: pd.DataFrame, sheet: DeviceSpec | None, fit: dict) -> None:
    for (phase, dtype), rows in df.groupby(["phase", "dtype"]):
        peak = _peak(sheet, dtype) if sheet else None
        rate = rows["flops"] / rows["median_s"]
        ax.scatter(rows["flops"], rate / peak if peak else rate / 1e12, s=10, label=f"{phase} {dtype}")
    ax.axhline(1.0, color="k", ls="--", lw=1)
    ax.set(xscale="log", xlabel="FLOPs", ylabel="achieved / datasheet peak", title="attention (SDPA)")
    ax.legend(fontsize=7)


def _panel_memory(ax, df: pd.DataFrame, sheet: DeviceSpec | None, fit: dict) -> None:
    peak = sheet.hbm_bandwidth_bytes_per_s if sheet else None
    for op, rows in df.groupby("op"):
        bw = rows["bytes"] / rows["median_s"]
        ax.plot(rows["bytes"], bw / peak if peak else bw / 1e9, marker=".", lw=0.8, label=op)
    ax.axhline(1.0, color="k", ls="--", lw=1)
    ax.set(xscale="log", yscale="log", xlabel="bytes moved", ylabel="achieved / datasheet bandwidth",
           title="memory-bound kernels")
    ax.legend(fontsize=6, ncol=2)


def _panel_copies(ax, df: pd.DataFrame, sheet: DeviceSpec | None, fit: dict) -> None:
    for (direction, pinned), rows in df.groupby(["direction", "pinned"]):
        ax.plot(rows["bytes"], rows["bytes"] / rows["median_s"] / 1e9, marker=".",
                label=f"{direction}{' pinned' if str(pinned) == 'True' else ''}")
    ax.set(xscale="log", xlabel="bytes", ylabel="GB/s", title="copies")
    ax.legend(fontsize=7)


_BUS = {"all_reduce": lambda n: 2 * (n - 1) / n, "all_gather": lambda n: (n - 1) / n,
        "reduce_scatter": lambda n: (n - 1) / n, "all_to_all": lambda n: (n - 1) / n, "send_recv": lambda n: 1.0}


def _panel_collectives(ax, df: pd.DataFrame, sheet: DeviceSpec | None, fit: dict) -> None:
    for (coll, ranks), rows in df.groupby(["collective", "ranks"]):
        bus = rows["bytes"] / rows["median_s"] * _BUS.get(coll, lambda n: 1.0)(ranks) / 1e9
        ax.plot(rows["bytes"], bus, marker=".", label=f"{coll} x{ranks}")
    ax.set(xscale="log", xlabel="bytes per rank", ylabel="bus bandwidth (GB/s)", title="collectives")
    ax.legend(fontsize=6)


def _panel_decode(ax, df: pd.DataFrame, sheet: DeviceSpec | None, fit: dict) -> None:
    for (phase, context), rows in df.groupby(["phase", "context"]):
        rows = rows.sort_values("batch")
        ax.plot(rows["batch"], rows["median_s"] * 1e3, marker=".", label=f"{phase} ctx {context}")
    ax.set(xlabel="batch (sequences)", ylabel="step time (ms)", title="decoder steps")
    ax.legend(fontsize=6)


PANELS = {"gemm": _panel_gemm, "attention": _panel_attention, "memory": _panel_memory, "copies": _panel_copies,
          "collectives": _panel_collectives, "decode": _panel_decode}


def plot_fidelity(result: dict[str, Any]):
    """Predicted vs measured (benchmarks/bench_profile_fidelity.py's JSON): with the measured
    profile and with the datasheet alone, for transformer layers and decode steps."""
    import matplotlib.pyplot as plt  # noqa: PLC0415 - plotting only

    fig, axes = plt.subplots(1, 2, figsize=(9, 4))
    for ax, part, title in ((axes[0], "layers", "transformer layer fwd+bwd"), (axes[1], "decode", "SmolLM2 decode step")):
        rows = result[part]
        measured = np.array([r["measured_s"] for r in rows]) * 1e3
        for source, marker in (("profile", "o"), ("datasheet", "x")):
            ax.scatter(measured, np.array([r[f"{source}_s"] for r in rows]) * 1e3, marker=marker, label=source)
        lim = [min(measured.min(), 1.0) * 0.8, measured.max() * 1.5]
        ax.plot(lim, lim, "k--", lw=1)
        ax.fill_between(lim, [x * 0.85 for x in lim], [x * 1.15 for x in lim], color="k", alpha=0.08, label="±15%")
        ax.set(xscale="log", yscale="log", xlabel="measured (ms)", ylabel="predicted (ms)", title=title)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def fits_frame(report: dict[str, Any]) -> pd.DataFrame:
    """fit_report's fits as a table: one row per op and part, error and samples."""
    rows = []
    for op, fit in report["fits"].items():
        rows.append({"op": op, "part": "all", "cv_median_abs_error": fit.get("cv_median_abs_error"),
                     "samples": fit.get("samples")})
        for name, part in fit.get("parts", {}).items():
            rows.append({"op": op, "part": name, "cv_median_abs_error": part.get("cv_median_abs_error"),
                         "samples": part.get("samples")})
    return pd.DataFrame(rows)
