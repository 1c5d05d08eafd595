"""Seconds from FLOPs and bytes: a roofline with achievable efficiencies and kernel overheads.

GEMM efficiency saturates with the smallest GEMM dimension (see `Efficiency`); attention
and element-wise kernels run at their own achievable fractions of the FLOP and HBM peaks.
"""

from __future__ import annotations

import numpy as np

from simulator.specs.hardware import DeviceSpec


def gemm_efficiency(device: DeviceSpec, min_dim):
    e = device.efficiency
    return e.gemm_max * min_dim / (min_dim + e.gemm_half_dim)


def gemm_s(device: DeviceSpec, flops, min_dim, calls: float = 0.0):
    """Time of `calls` GEMMs totalling `flops`, whose smallest dimension is `min_dim`; each call
    adds the device's un-hidden per-GEMM host time (zero on GPUs, whose launches are async)."""
    return flops / (device.peak_flops * gemm_efficiency(device, min_dim)) + gemm_calls_s(device, calls)


def gemm_calls_s(device: DeviceSpec, calls, streaming: bool = False):
    """Host time of `calls` GEMM calls that no asynchronous launch hides (CPU dispatch);
    `streaming`: few-row GEMMs streaming their weights (decode), which may cost otherwise."""
    e = device.efficiency
    per_call = e.weight_stream_overhead_us if streaming and e.weight_stream_overhead_us is not None else e.gemm_overhead_us
    return calls * per_call * 1e-6


def attention_efficiency(device: DeviceSpec, seq=None):
    """Achieved fraction of peak of causal prefill attention over sequences of `seq` tokens
    (a float or an array), in `Efficiency.attention`'s convention (the full s x s square).

    A blocked causal kernel computes whole blocks on the diagonal: about half a block of extra
    keys per query row, a fixed cost per row that short sequences feel most. Without a measured
    curve the efficiency therefore saturates with the sequence length as GEMMs do with their
    smallest dimension: eff(s) = attention * s / (s + attention_half_seq). A device with a
    measured curve (`attention_curve`) reads it instead: a CPU flash kernel changes its query
    block with the length (PyTorch's: 32 rows below 192 queries, 64 below 768, 256 above,
    aten/src/ATen/native/cpu/FlashAttentionKernel.cpp), so its rate steps at those lengths
    (on a 2-core AMD EPYC, bf16: ~47 GFLOP/s of visible pairs at 767 tokens, ~51 at 768) where
    one saturating form would be smooth. Between the measured points of one blocking the
    efficiency is interpolated in log length, beyond them held at the nearest point."""
    e = device.efficiency
    if seq is None:
        return e.attention
    if not e.attention_curve:
        return e.attention * seq / (seq + e.attention_half_seq)
    return curve_efficiency(e.attention_curve, e.attention_steps, seq)


def curve_efficiency(curve, steps, seq):
    """`curve` [(length, efficiency), ...] read at `seq` within the blocking regime `steps`
    puts it in; a regime without points of its own is interpolated across its neighbours' points."""
    s = np.asarray(seq, dtype=float)
    lengths = np.array([p[0] for p in curve], dtype=float)
    effs = np.array([p[1] for p in curve], dtype=float)
    edges = np.asarray(sorted(steps), dtype=float)
    regime_of_points = np.searchsorted(edges, lengths, side="right")
    regime = np.searchsorted(edges, s, side="right")
    out = np.interp(np.log(s), np.log(lengths), effs)   # across regimes: only for a regime without points
    for r in np.unique(regime_of_points):
        own = regime_of_points == r
        out = np.where(regime == r, np.interp(np.log(s), np.log(lengths[own]), effs[own]), out)
    return float(out) if np.ndim(out) == 0 else out


def attention_s(device: DeviceSpec, flops, decode_flops=0.0, seq=None):
    """Attention core (score and value products, or a fused flash kernel) over sequences of
    `seq` tokens (`attention_efficiency`); `decode_flops` are those of one-query decode
    attention, at the device's decode efficiency where it has one."""
    e = device.efficiency
    return (flops / attention_efficiency(device, seq)
            + decode_flops / (e.attention_decode or e.attention)) / device.peak_flops


def memory_bound_s(device: DeviceSpec, nbytes, kernels: float = 0.0, simple: bool = False):
    """Element-wise kernels moving `nbytes` through HBM, plus their launch overheads; `simple`:
    adds, multiplies, casts and copies (an eager layer's extra passes), at their own efficiency
    where the device has one (a CPU core widens bf16 to fp32 for a norm's or an activation's
    math, so those run several times slower per byte than an add)."""
    e = device.efficiency
    eff = (e.memory_bound_simple or e.memory_bound) if simple else e.memory_bound
    return nbytes / (device.hbm_bandwidth_bytes_per_s * eff) + kernels * e.kernel_overhead_us * 1e-6
