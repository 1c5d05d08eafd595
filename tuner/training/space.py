"""The training search space: legal global layouts, and the grid of per-stage memory options.

Global layout (`Layout`): TP x PP x DP factorization, micro-batch size, virtual stages,
sequence parallel and the recompute mode of non-checkpointed layers (none or selective).
These are shared by every stage. Per-stage options (`option_grid`): ZeRO stage, offload
fractions of weights, gradients, optimizer states and activations, and the number of
checkpointed layers; every stage may choose differently.

Sharded data parallel (design note). FSDP groups are global, so the HSDP shard group size
(`dp_shard`) is a layout setting. A pipeline-free layout (pp 1) with dp > 1 comes twice:
once with ZeRO 0-2 per stage (the Megatron-style family), and once as a sharded layout
(`fsdp`) whose only ZeRO stage is 3 and whose grid adds FSDP's two schedules of weights:
reshard_after_forward off (`kf`) and reshard_between_microbatches off (`ku`; it makes `kf`
moot, so three rows, not four). With one stage a plan states them exactly; with pp > 1 they
would have to agree across stages, so pipelined layouts keep FSDP's defaults (ZeRO-3 stays
in their per-stage grid). Sharded layouts also come with every HSDP shard size: each divisor
of dp strictly between 1 and dp. Each plan falls in one family (`family_of`):

- FSDP: ZeRO-3 on all of dp, tp 1, pp 1;
- HSDP: ZeRO-3 on shard groups of dp_shard < dp ranks, replicated dp / dp_shard times, pp 1;
- FSDP+TP: ZeRO-3 on all of dp with tp > 1, pp 1;
- 3D: the Megatron-style space, pp > 1 (any ZeRO stage per stage) or ZeRO 0-2 data parallel
  with any tp.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from simulator.specs.hardware import ClusterSpec
from simulator.specs.model import TransformerSpec
from simulator.specs.plan import MAX_MICROBATCHES

OFFLOAD_LEVELS = (0.0, 0.5, 1.0)
FAMILIES = ("FSDP", "HSDP", "FSDP+TP", "3D")
FSDP_SCHEDULES = ((0.0, 0.0), (1.0, 0.0), (0.0, 1.0))  # (kf, ku): default, keep after forward, keep between micro-batches
MICRO_BATCH_SIZES = (1, 2, 4, 8, 16)


def divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


@dataclass(frozen=True)
class Layout:
    """Settings shared by all stages of a plan."""

    tp: int
    pp: int
    dp: int
    micro_batch_size: int
    virtual_stages: int
    num_microbatches: int
    sequence_parallel: bool = False
    selective: bool = False
    fsdp: bool = False              # pp 1, every rank ZeRO-3, FSDP's schedules in the grid
    dp_shard: int | None = None     # HSDP shard group size (None: all of dp)

    @property
    def family(self) -> str:
        return family_of(self.tp, self.pp, self.dp, self.dp_shard, (3,) if self.fsdp else (0,))

    def describe(self) -> str:
        v = f" v{self.virtual_stages}" if self.virtual_stages > 1 else ""
        flags = "".join((" sp" if self.sequence_parallel else "", " sel" if self.selective else "",
                         " fsdp" if self.fsdp and self.dp_shard is None else "",
                         f" hsdp{self.dp_shard}" if self.dp_shard else ""))
        return f"tp{self.tp} pp{self.pp}{v} dp{self.dp} mbs{self.micro_batch_size}{flags}"


def family_of(tp: int, pp: int, dp: int, dp_shard: int | None, zero_stages) -> str:
    """The family of a plan (see the module docstring)."""
    if pp > 1 or dp == 1 or min(zero_stages) < 3:
        return "3D"
    if dp_shard not in (None, dp):
        return "HSDP"
    return "FSDP+TP" if tp > 1 else "FSDP"


def tp_allowed(model: TransformerSpec, tp: int) -> bool:
    kv = model.num_kv_heads
    return (model.num_attention_heads % tp == 0 and model.ffn_hidden_size % tp == 0
            and (kv % tp == 0 or tp % kv == 0))


def layouts(model: TransformerSpec, cluster: ClusterSpec, global_batch_size: int,
            tp_within_node: bool = True, max_virtual_stages: int = 4,
            micro_batch_sizes: tuple[int, ...] = MICRO_BATCH_SIZES, sharded: bool = True,
            max_pp: int | None = None) -> Iterator[Layout]:
    """Every legal layout: degrees that fill the cluster and divide the model and the batch;
    with `sharded`, also the sharded-data-parallel layouts (FSDP, HSDP) of each pp 1 layout."""
    n, L = cluster.num_devices, model.num_layers
    for tp in divisors(n):
        if not tp_allowed(model, tp) or (tp_within_node and tp > cluster.devices_per_node):
            continue
        for pp in divisors(n // tp):
            dp = n // (tp * pp)
            if pp > L or (max_pp is not None and pp > max_pp):
                continue
            for b in micro_batch_sizes:
                if global_batch_size % (b * dp):
                    continue
                m = global_batch_size // (b * dp)
                if m > MAX_MICROBATCHES:  # TrainingPlan refuses it: the simulator would run each
                    continue
                for v in range(1, max_virtual_stages + 1):
                    if v > 1 and (pp < 2 or m % pp or L % v or L < pp * v):
                        continue
                    for sp, sel in itertools.product((False, True), repeat=2):
                        if sp and tp == 1:
                            continue
                        yield Layout(tp, pp, dp, b, v, m, sp, sel)
                        if sharded and pp == 1 and dp > 1:
                            for shard in [None, *(k for k in divisors(dp) if 1 < k < dp)]:
                                yield Layout(tp, pp, dp, b, v, m, sp, sel, fsdp=True, dp_shard=shard)


def option_grid(dp: int, offload_levels: tuple[float, ...] = OFFLOAD_LEVELS,
                zero_stages: tuple[int, ...] = (0, 1, 2, 3),
                fsdp_schedules: tuple[tuple[float, float], ...] = ((0.0, 0.0),)) -> dict[str, np.ndarray]:
    """Flat arrays over per-stage options (ZeRO stage x offload fractions x, for ZeRO-3,
    FSDP's (kf, ku) schedules), without `k`.

    Weight offload needs gradient offload (the gradients of offloaded weights are produced
    where the weights live, as in ZeRO-Offload and Mist).
    """
    zeros = zero_stages if dp > 1 else (0,)
    rows = [
        (z, ow, og, oo, oa, kf, ku)
        for z, ow, og, oo, oa in itertools.product(zeros, *[offload_levels] * 4)
        if not (ow > 0 and og == 0)
        for kf, ku in (fsdp_schedules if z == 3 else ((0.0, 0.0),))
    ]
    z, ow, og, oo, oa, kf, ku = (np.array(col, dtype=float) for col in zip(*rows))
    return {"zero": z, "z1": (z >= 1) * 1.0, "z2": (z >= 2) * 1.0, "z3": (z >= 3) * 1.0,
            "o_w": ow, "o_g": og, "o_o": oo, "o_a": oa, "kf": kf, "ku": ku}


def layout_grid(layout: Layout, host_offload: bool = True) -> dict[str, np.ndarray]:
    """The per-stage option grid of a layout: ZeRO 3 with FSDP's schedules for a sharded
    layout, ZeRO 0-2 for the other pp 1 layouts, every ZeRO stage for pipelined ones; no
    offloading where the devices have no separate host memory (CPU ranks)."""
    levels = OFFLOAD_LEVELS if host_offload else (0.0,)
    if layout.fsdp:
        return option_grid(layout.dp, levels, zero_stages=(3,), fsdp_schedules=FSDP_SCHEDULES)
    return option_grid(layout.dp, levels, zero_stages=(0, 1, 2) if layout.pp == 1 else (0, 1, 2, 3))


def inflight_microbatches(stage: int, pp: int, num_microbatches: int, virtual_stages: int) -> float:
    """Micro-batches of a whole stage's activations held at its peak (1F1B / interleaved 1F1B).

    1F1B: stage i holds min(p - i, m). Interleaved (Megatron-LM's warm-up): stage i holds
    (p - i - 1)*2 + (v - 1)*p + 1 chunks of 1/v of the stage, capped at m*v chunks.
    """
    if virtual_stages == 1:
        return float(min(pp - stage, num_microbatches))
    v = virtual_stages
    chunks = min((pp - stage - 1) * 2 + (v - 1) * pp + 1, num_microbatches * v)
    return chunks / v


def layer_band(num_layers: int, pp: int, virtual_stages: int, width: float = 0.25) -> list[int]:
    """Layer counts a stage may take: a band of +-width around L/p (at least +-1 step).

    With v virtual stages a stage holds a multiple of v layers, so that its chunks are equal
    (Megatron-LM's interleaved schedule requires it; unequal chunks stall the pipeline).
    """
    v = virtual_stages
    mean = num_layers / pp
    half = max(v, round(width * mean))
    lo = max(v, int(np.floor(mean)) - half)
    hi = min(num_layers - (pp - 1) * v, int(np.ceil(mean)) + half)
    return [n for n in range(lo, hi + 1) if n % v == 0]
