"""The training search space: legal global layouts, and the grid of per-stage memory options.

Global layout (`Layout`): TP x PP x DP factorization, micro-batch size, virtual stages,
sequence parallel and the recompute mode of non-checkpointed layers (none or selective).
These are shared by every stage. Per-stage options (`option_grid`): ZeRO stage, offload
fractions of weights, gradients, optimizer states and activations, and the number of
checkpointed layers; every stage may choose differently.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from simulator.specs.hardware import ClusterSpec
from simulator.specs.model import TransformerSpec

OFFLOAD_LEVELS = (0.0, 0.5, 1.0)
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

    def describe(self) -> str:
        v = f" v{self.virtual_stages}" if self.virtual_stages > 1 else ""
        flags = "".join((" sp" if self.sequence_parallel else "", " sel" if self.selective else ""))
        return f"tp{self.tp} pp{self.pp}{v} dp{self.dp} mbs{self.micro_batch_size}{flags}"


def tp_allowed(model: TransformerSpec, tp: int) -> bool:
    kv = model.num_kv_heads
    return (model.num_attention_heads % tp == 0 and model.ffn_hidden_size % tp == 0
            and (kv % tp == 0 or tp % kv == 0))


def layouts(model: TransformerSpec, cluster: ClusterSpec, global_batch_size: int,
            tp_within_node: bool = True, max_virtual_stages: int = 4,
            micro_batch_sizes: tuple[int, ...] = MICRO_BATCH_SIZES) -> Iterator[Layout]:
    """Every legal layout: degrees that fill the cluster and divide the model and the batch."""
    n, L = cluster.num_devices, model.num_layers
    for tp in divisors(n):
        if not tp_allowed(model, tp) or (tp_within_node and tp > cluster.devices_per_node):
            continue
        for pp in divisors(n // tp):
            dp = n // (tp * pp)
            if pp > L:
                continue
            for b in micro_batch_sizes:
                if global_batch_size % (b * dp):
                    continue
                m = global_batch_size // (b * dp)
                for v in range(1, max_virtual_stages + 1):
                    if v > 1 and (pp < 2 or m % pp or L % v or L < pp * v):
                        continue
                    for sp, sel in itertools.product((False, True), repeat=2):
                        if sp and tp == 1:
                            continue
                        yield Layout(tp, pp, dp, b, v, m, sp, sel)


def option_grid(dp: int, offload_levels: tuple[float, ...] = OFFLOAD_LEVELS,
                zero_stages: tuple[int, ...] = (0, 1, 2, 3)) -> dict[str, np.ndarray]:
    """Flat arrays over per-stage options (ZeRO stage x offload fractions), without `k`.

    Weight offload needs gradient offload (the gradients of offloaded weights are produced
    where the weights live, as in ZeRO-Offload and Mist).
    """
    zeros = zero_stages if dp > 1 else (0,)
    rows = [
        (z, ow, og, oo, oa)
        for z, ow, og, oo, oa in itertools.product(zeros, *[offload_levels] * 4)
        if not (ow > 0 and og == 0)
    ]
    z, ow, og, oo, oa = (np.array(col, dtype=float) for col in zip(*rows))
    return {"zero": z, "z1": (z >= 1) * 1.0, "z2": (z >= 2) * 1.0, "z3": (z >= 3) * 1.0,
            "o_w": ow, "o_g": og, "o_o": oo, "o_a": oa}


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
