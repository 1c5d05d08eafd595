"""Sharded data parallel (ZeRO-3, PyTorch FSDP/FSDP2, HSDP): its communication and buffers.

What moves (per layer = per FSDP unit, per micro-batch, per rank), as FSDP2 runs it
(PyTorch `torch.distributed.fsdp.fully_shard`; Rajbhandari et al. SC'20, Sec. 7.2.2):
- forward: all-gather the unit's 16-bit weights (W bytes for this TP shard) over the shard
  group of n ranks: each rank sends and receives (n-1)/n * W;
- backward: all-gather them again, unless `reshard_after_forward` was off (the weights stayed
  gathered: ZeRO-2-like memory, no backward gather); DeepSpeed's module hooks gather once
  more for the recompute forward of a checkpointed layer (`regather_for_recompute`), while
  FSDP2 runs the recompute on its pre-backward gather (its forward hooks skip the unshard in
  the PRE_BACKWARD state);
- backward: reduce-scatter the unit's gradients (gradient dtype, `gradient_dtype`), (n-1)/n of
  them per rank; under HSDP the shard is then all-reduced across the dp / dp_shard replicas;
- the root unit (embedding, final norm, LM head) is gathered once at the start of forward and
  kept until its gradients are reduce-scattered at the very end of backward.
With `reshard_between_microbatches` off, weights are gathered once per iteration (first
micro-batch) and gradients accumulate unsharded and are reduce-scattered once (last
micro-batch), FSDP2's `set_requires_gradient_sync(False)` + `set_reshard_after_backward(False)`
between micro-batches: the one-time communication is spread evenly over the m micro-batches.

Overlap (design note). Collectives run on their own stream and prefetch one unit ahead
(FSDP2's implicit forward prefetch and explicit backward prefetch): the gather of unit i+1
runs while unit i computes, and the reduce-scatter of unit i while unit i-1 computes. Gathers
and reduce-scatters share the same links, so per unit the backward's collectives add up.
For L uniform units with compute C and communication X per unit, a two-stage pipeline (comm,
then compute) takes X_first + L*C + (L-1)*max(0, X - C) + X_last: the first gather and the
last reduce-scatter are always exposed, the rest only where they outlast compute.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from simulator.costs import comm

if TYPE_CHECKING:
    from simulator.training.stage_model import StageModel

FSDP_OPTION_KEYS = ("kf", "ku", "rg", "f8", "f8g")
"""kf: keep weights after forward (reshard_after_forward off); ku: keep weights and gradients
unsharded between micro-batches; rg: gather again for the recompute; f8: fp8 linears;
f8g: fp8 all-gather of linear weights. All 0/1, default 0 (FSDP2's defaults, bf16)."""


def plan_fsdp_options(plan) -> dict[str, float]:
    """The FSDP option symbols of a training plan."""
    return {"kf": float(not plan.reshard_after_forward), "ku": float(not plan.reshard_between_microbatches),
            "rg": float(plan.regather_for_recompute), "f8": float(plan.precision == "fp8"),
            "f8g": float(plan.fp8_all_gather)}


def fsdp_memory_options(o: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The ZeRO indicators for the model-state memory at the stage's peak: weights kept after
    forward or between micro-batches are whole then (2 bytes/param, like ZeRO-2), and
    gradients accumulated unsharded are whole too."""
    z3 = o["z3"]
    return {"z3": z3 * (1 - o["kf"]) * (1 - o["ku"]), "z2": o["z2"] * (1 - z3 * o["ku"])}


def _pipelined(first, per_unit, compute, last, units):
    """Exposed time of `units` units whose communication `per_unit` is prefetched one ahead of
    `compute`; `first` and `last` are always exposed."""
    return first + last + np.maximum(units - 1, 0) * np.maximum(0.0, per_unit - compute)


def fsdp_costs(sm: StageModel, o: dict[str, np.ndarray], layers, c1: dict, lf: dict,
               extra_params: float, bwd_recompute) -> dict[str, np.ndarray]:
    """Exposed sharded-data-parallel communication per micro-batch (`fwd_zero3_comm`,
    `bwd_zero3_comm`) and the transient buffers it needs (`zero3_buffer`, bytes)."""
    z3, kf, ku, rg = o["z3"], o["kf"], o["ku"], o["rg"]
    n, links, m = sm.dp_shard, sm.links, sm.num_microbatches
    gather_bytes = np.where(o["f8g"] > 0, c1["zero3_gather_bytes_fp8"], c1["zero3_gather_bytes"])
    grad_bytes = o["gb"] * c1["stage_params"]  # one layer's gradients on this TP shard
    gather = comm.allgather_s(gather_bytes, n, links.shard)
    scatter = sm.sharded_grad_sync_s(grad_bytes)
    root_gather = comm.allgather_s(2.0 * extra_params, n, links.shard)
    root_scatter = sm.sharded_grad_sync_s(o["gb"] * extra_params)

    fwd_compute = lf["compute"] + lf["tp_comm"]
    bwd_compute = 2 * fwd_compute + bwd_recompute / np.maximum(layers, 1)
    forward = _pipelined(gather + root_gather, gather, fwd_compute, 0.0, layers)

    k_share = o["k"] / np.maximum(layers, 1)  # checkpointed share of the layers
    bwd_gather = gather * (1 - kf) * (1 + rg * k_share)
    every = _pipelined(bwd_gather, bwd_gather + scatter, bwd_compute, scatter + root_scatter, layers)
    once = _pipelined(0.0, scatter, bwd_compute, scatter + root_scatter, layers)
    spread = 1 - ku + ku / m
    buffer = (1 - ku) * ((1 - kf) * 2 * gather_bytes + grad_bytes + 2.0 * extra_params)
    active = z3 * (n * sm.replicas > 1)
    return {"fwd_zero3_comm": active * forward * spread,
            "bwd_zero3_comm": active * ((1 - ku) * every + ku * once / m),
            "zero3_buffer": z3 * buffer}
