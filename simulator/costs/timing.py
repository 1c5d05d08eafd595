"""Seconds from FLOPs and bytes: a roofline with achievable efficiencies and kernel overheads.

GEMM efficiency saturates with the smallest GEMM dimension (see `Efficiency`); attention
and element-wise kernels run at their own achievable fractions of the FLOP and HBM peaks.
"""

from __future__ import annotations

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


def attention_s(device: DeviceSpec, flops, decode_flops=0.0, seq=None):
    """Attention core (score and value products, or a fused flash kernel) over sequences of
    `seq` tokens; `decode_flops` are those of one-query decode attention, at the device's
    decode efficiency where it has one.

    A blocked causal kernel computes whole blocks on the diagonal: about half a block of extra
    keys per query row, a fixed cost per row that short sequences feel most. The efficiency
    therefore saturates with the sequence length as GEMMs do with their smallest dimension:
    eff(s) = attention * s / (s + attention_half_seq)."""
    e = device.efficiency
    eff = e.attention if seq is None else e.attention * seq / (seq + e.attention_half_seq)
    return (flops / eff + decode_flops / (e.attention_decode or e.attention)) / device.peak_flops


def memory_bound_s(device: DeviceSpec, nbytes, kernels: float = 0.0):
    """Element-wise kernels moving `nbytes` through HBM, plus their launch overheads."""
    e = device.efficiency
    return nbytes / (device.hbm_bandwidth_bytes_per_s * e.memory_bound) + kernels * e.kernel_overhead_us * 1e-6
