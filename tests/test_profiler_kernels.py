"""The kernel families of the profiler: GEMM, attention, memory-bound ops, copies.

Each family is checked three ways: its sweep lists legal shapes of its table's key; `measure`
on a few tiny shapes yields complete rows with positive times; `fit` recovers known
parameters from a synthetic table (exact model, 2% noise) and reports a small held-out error.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

torch = pytest.importorskip("torch")

from profiler import attention, copies, gemm, memory  # noqa: E402
from profiler.context import ProfileContext  # noqa: E402
from profiler.timers import Timer  # noqa: E402
from simulator.specs.catalog import load_model  # noqa: E402
from simulator.specs.profile import TABLES  # noqa: E402

FAST = ProfileContext(quick=True, timer=Timer("cpu", warmup=1, reps=3, min_reps=1, budget_s=0.01))
RNG = np.random.default_rng(0)


def noisy(seconds: np.ndarray) -> np.ndarray:
    return seconds * (1 + 0.02 * RNG.standard_normal(len(seconds)))


def assert_rows(op: str, rows: list[dict], shapes: list[dict]) -> None:
    assert len(rows) == len(shapes)
    for row, shape in zip(rows, shapes):
        assert set(TABLES[op].columns) <= set(row)
        assert all(row[c] == shape[c] for c in TABLES[op].key)
        assert 0 < row["p10_s"] <= row["median_s"] <= row["p90_s"] and row["reps"] >= 1


def assert_close(found: float, expected: float, rel: float = 0.05) -> None:
    assert found == pytest.approx(expected, rel=rel)


def assert_sweep(op: str, module) -> None:
    shapes = module.sweep(FAST)
    assert shapes and all(set(s) == set(TABLES[op].key) for s in shapes)
    keys = [tuple(s[c] for c in TABLES[op].key) for s in shapes]
    assert len(keys) == len(set(keys)), "sweep repeats a shape"


# --- GEMM -------------------------------------------------------------------------------

def test_gemm_shapes_follow_the_layer():
    model = load_model("llama-3.2-1b")  # h 2048, 32 heads of 64, 8 KV heads, ffn 8192, SwiGLU
    assert gemm.tp_degrees(model) == [1, 2, 4, 8]
    assert gemm.layer_matrices(model, 4) == [(2048, (2048 + 2 * 512) // 4), (512, 2048), (2048, 2048),
                                             (2048, 2048), (2048, 4096)]
    assert gemm.training_gemms(128, 2048, 768) == [(128, 768, 2048), (128, 2048, 768), (2048, 768, 128)]
    assert gemm.tp_degrees(load_model("smollm2-135m")) == [1]  # 9 heads, 3 KV heads


def test_gemm_sweep_is_deduplicated_and_capped():
    assert_sweep("gemm", gemm)
    for s in gemm.sweep(FAST):
        assert 2 * s["m"] * s["n"] * s["k"] <= gemm.CPU_QUICK_MAX_FLOPS and s["dtype"] in ("fp32", "bf16")


def test_gemm_measure_and_fit_on_tiny_shapes():
    shapes = [{"m": m, "n": n, "k": k, "dtype": d} for m, n, k in ((16, 32, 64), (64, 64, 64), (128, 32, 16),
                                                                    (32, 128, 128)) for d in ("fp32", "bf16")]
    rows = list(gemm.measure(FAST, shapes))
    assert_rows("gemm", rows, shapes)
    assert rows[0]["flops"] == 2 * 16 * 32 * 64 and rows[0]["bytes"] == (16 * 64 + 64 * 32 + 16 * 32) * 4
    fit = gemm.fit(pd.DataFrame(rows), {"kind": "cpu"})
    assert {"fp32", "bf16", "cv_median_abs_error", "samples"} <= set(fit)
    assert {"flops_per_s", "half_dim", "overhead_s", "cv_median_abs_error", "samples"} <= set(fit["fp32"])


def test_gemm_fit_recovers_known_parameters():
    dims = np.array([64, 128, 256, 512, 1024, 2048, 4096])
    m, n, k = (RNG.choice(dims, 120) for _ in range(3))
    df = pd.DataFrame({"m": m, "n": n, "k": k, "dtype": "bf16"}).drop_duplicates()
    df = pd.concat([df, df.assign(dtype="fp32")], ignore_index=True)
    df["flops"] = 2.0 * df.m * df.n * df.k
    df["bytes"] = (df.m * df.k + df.k * df.n + df.m * df.n) * df.dtype.map(gemm.ELEMENT_BYTES)
    truth = {"bf16": (300e9, 40.0, 10e-6), "fp32": (80e9, 10.0, 5e-6)}
    rate, half, c = (df.dtype.map({d: t[i] for d, t in truth.items()}) for i in range(3))
    min_dim = df[["m", "n", "k"]].min(axis=1)
    df["median_s"] = noisy((df.flops * (1 + half / min_dim) / rate + c).to_numpy())
    fit = gemm.fit(df, {"kind": "cpu"})
    for dtype, (f, h, o) in truth.items():
        assert_close(fit[dtype]["flops_per_s"], f)
        assert_close(fit[dtype]["half_dim"], h)
        assert_close(fit[dtype]["overhead_s"], o)
    assert fit["cv_median_abs_error"] < 0.03 and fit["samples"] == len(df)


# --- attention --------------------------------------------------------------------------

def test_attention_flops_and_bytes():
    shape = {"phase": "prefill", "batch": 2, "seq_q": 8, "seq_kv": 8, "heads": 4, "kv_heads": 2,
             "head_dim": 16, "dtype": "bf16"}
    assert attention.values(shape) == {"flops": 4 * 2 * 4 * 16 * 8 * 9 // 2,
                                       "bytes": 2 * 16 * (2 * 4 * 8 + 2 * 2 * 8) * 2}
    decode = {**shape, "phase": "decode", "seq_q": 1, "seq_kv": 100}
    assert attention.values(decode)["flops"] == 4 * 2 * 4 * 16 * 100


def test_attention_measure_and_fit_on_tiny_shapes():
    assert_sweep("attention", attention)
    shapes = [{"phase": p, "batch": b, "seq_q": 1 if p == "decode" else s, "seq_kv": s, "heads": 4,
               "kv_heads": kv, "head_dim": 64, "dtype": d}
              for p in ("prefill", "decode") for b, s, kv in ((1, 32, 4), (2, 64, 2), (1, 128, 1)) for d in ("fp32", "bf16")]
    rows = list(attention.measure(FAST, shapes))
    assert_rows("attention", rows, shapes)
    fit = attention.fit(pd.DataFrame(rows), {"kind": "cpu"})
    assert {"fp32", "bf16", "cv_median_abs_error", "samples"} <= set(fit)
    assert {"flops_per_s", "bytes_per_s", "overhead_s", "cv_median_abs_error", "samples"} <= set(fit["bf16"])


def test_attention_fit_recovers_known_parameters():
    df = pd.DataFrame([{**s, **attention.values(s)}
                       for s in attention.sweep(ProfileContext(quick=False, dtypes=("bf16",)))])
    x = attention.features(df)
    truth_f, truth_fd, keys, truth_b, truth_c = 50e9, 5e9, 32.0, 20e9, 30e-6
    seconds = (x.flops + keys * x.row_flops) / truth_f + x.decode_flops / truth_fd + x.bytes / truth_b + truth_c
    df["median_s"] = noisy(seconds.to_numpy())
    fit = attention.fit(df, {"kind": "cpu"})["bf16"]
    assert_close(fit["flops_per_s"], truth_f)
    assert_close(fit["decode_flops_per_s"], truth_fd)
    assert_close(fit["diagonal_keys"], keys, rel=0.1)
    assert_close(fit["bytes_per_s"], truth_b, rel=0.1)
    assert_close(fit["overhead_s"], truth_c, rel=0.2)  # 5-20% of the shortest rows
    assert fit["cv_median_abs_error"] < 0.03
    # the curve: the measured visible-pair rate at each prefill length, where the kernel's blocks change
    pre = df[df.phase == "prefill"]
    lengths = sorted(pre.seq_q.unique())
    assert [s for s, _ in fit["prefill_curve"]] == lengths and len(lengths) >= 7
    at_512 = pre[pre.seq_q == 512]
    assert dict(fit["prefill_curve"])[512] == pytest.approx((at_512.flops / at_512.median_s).median())
    assert fit["q_block_steps"] == [192, 768]
    assert "q_block_steps" not in attention.fit(df, {"kind": "cuda"})["bf16"]


# --- memory-bound kernels ---------------------------------------------------------------

def test_memory_measure_and_fit_on_tiny_shapes():
    assert_sweep("memory", memory)
    shapes = [{"op": op, "elements": n, "dtype": d} for op in memory.OPS for n in (4096, 16384) for d in ("fp32", "bf16")]
    rows = list(memory.measure(FAST, shapes))
    assert_rows("memory", rows, shapes)
    assert rows[0]["bytes"] == 2 * 4096 * 4  # layer_norm: read and write once
    fit = memory.fit(pd.DataFrame(rows), {"kind": "cpu"})
    assert {"bytes_per_s", "overhead_s", "cv_median_abs_error", "samples", "by_op"} <= set(fit)
    assert set(fit["by_op"]) == set(memory.OPS)
    assert {"bytes_per_s", "overhead_s"} <= set(fit["by_op"]["adamw"])


def test_memory_fit_recovers_known_parameters():
    df = pd.DataFrame(memory.sweep(ProfileContext(quick=False)))
    df["bytes"] = [memory.traffic_bytes(o, n, d) for o, n, d in zip(df.op, df.elements, df.dtype)]
    fresh = memory.features(df, {"kind": "cpu"})["fresh_bytes"]
    assert fresh.gt(0).any() and not fresh[df.op == "adamw"].any()
    df["median_s"] = noisy((df.bytes / 30e9 + fresh / 3e9 + 4e-6).to_numpy())
    fit = memory.fit(df, {"kind": "cpu"})
    assert_close(fit["bytes_per_s"], 30e9)
    assert_close(fit["fresh_bytes_per_s"], 3e9, rel=0.1)
    assert_close(fit["overhead_s"], 4e-6)
    assert fit["cv_median_abs_error"] < 0.03
    assert_close(fit["by_op"]["add"]["bytes_per_s"], 30e9, rel=0.1)
    assert memory.features(df, {"kind": "cuda"})["fresh_bytes"].eq(0).all()


# --- copies -----------------------------------------------------------------------------

def test_copies_measure_and_fit_on_tiny_shapes():
    assert_sweep("copies", copies)
    assert {s["direction"] for s in copies.sweep(FAST)} == {"d2d"}
    shapes = [{"direction": "d2d", "pinned": False, "bytes": n} for n in (4096, 65536, 1 << 20)]
    rows = list(copies.measure(FAST, shapes))
    assert_rows("copies", rows, shapes)
    fit = copies.fit(pd.DataFrame(rows), {"kind": "cpu"})
    assert {"d2d", "cv_median_abs_error", "samples"} <= set(fit)
    assert {"bytes_per_s", "overhead_s", "cv_median_abs_error", "samples"} <= set(fit["d2d"])


def test_copies_fit_recovers_each_route():
    truth = {("h2d", False): (10e9, 10e-6), ("h2d", True): (25e9, 5e-6), ("d2h", True): (20e9, 6e-6)}
    df = pd.DataFrame([{"direction": d, "pinned": str(p), "bytes": n, "bw": bw, "c": c}  # as read from CSV
                       for (d, p), (bw, c) in truth.items() for n in copies.SIZES])
    df["median_s"] = noisy((df.bytes / df.bw + df.c).to_numpy())
    fit = copies.fit(df, {"kind": "cuda"})
    for (d, p), (bw, c) in truth.items():
        entry = fit[copies.route(d, p)]
        assert_close(entry["bytes_per_s"], bw)
        assert_close(entry["overhead_s"], c, rel=0.1)
    assert fit["cv_median_abs_error"] < 0.03 and fit["samples"] == len(df)


def test_copies_fit_finds_the_cache_knee():
    size = pd.Series(copies.SIZES, dtype=float)
    knee = 4 << 20  # a memcpy at 50 GB/s in the caches, 10 GB/s past them
    seconds = 1e-6 + size / 50e9 + (size - knee).clip(lower=0) * (1 / 10e9 - 1 / 50e9)
    df = pd.DataFrame({"direction": "d2d", "pinned": False, "bytes": size, "median_s": noisy(seconds.to_numpy())})
    entry = copies.fit(df, {"kind": "cpu"})["d2d"]
    assert entry["cache_bytes"] == knee
    assert_close(entry["bytes_per_s"], 10e9)
    assert_close(entry["cached_bytes_per_s"], 50e9, rel=0.1)
