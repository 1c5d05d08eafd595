"""Turn one local module (a whole `Decoder`, or one pipeline stage's chunk) into what the plan runs.

`parallelize` is torchtitan's `parallelize_llama` for both model families (GPT and Llama
blocks differ inside, not in how they are sharded), in this order:

    1. tensor parallel  (delegated to executor/training/tensor_parallel.py: DTensor linears)
    2. activation checkpointing  (the plan's whole layers, counted from the stage's first
                                  layer; selective recompute of the attention core on the rest)
    3. activation offload  (saved-tensor hooks that keep what backward needs in host memory)
    4. data parallel last, because it wraps or shards whatever the steps above left:
         ZeRO-0  DDP                    ZeRO-2  FSDP2, reshard_after_forward=False
         ZeRO-1  DDP + sharded AdamW    ZeRO-3  FSDP2, the plan's reshard_after_forward
         HSDP    FSDP2 on the 2-D (replicate, shard) mesh; CPU offload: FSDP2's CPUOffloadPolicy

Checkpointing before FSDP matters: `fully_shard` then wraps each checkpointed block, so the
recompute of a block runs inside that block's all-gather, as FSDP2 does it (the simulator's
`regather_for_recompute: false`).

What the runner cannot express is refused by `check_runnable` with a `SpecError` naming the
field, never rounded: fractional offloads (FSDP2 and saved-tensor hooks move whole tensors),
weights or gradients offloaded without the other two states, fp8 GEMMs.

Where a pipeline stage's modules are already held by its schedule, data parallel is applied
in place (`in_place=True`): the composable `replicate` (DDP semantics on FSDP2's machinery)
instead of the DDP wrapper. Tensor-parallel (DTensor) parameters take the same path.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from contextlib import contextmanager
from types import ModuleType

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, OffloadPolicy, fully_shard
from torch.nn.parallel import DistributedDataParallel

from executor.training.checkpointing import (
    apply_activation_checkpointing,
    around_forward,
)
from executor.training.degrees import ParallelDegrees
from executor.training.optimizer import fsdp_offload
from simulator.errors import SpecError
from simulator.specs.plan import Offload, TrainingPlan

OFFLOAD_KINDS = ("weights", "gradients", "optimizer", "activations")
EXTENSIONS = {"tensor_parallel": "plan.tp", "pipeline": "plan.pp"}


def parallel_extension(name: str, value: int) -> ModuleType:
    """The tensor- or pipeline-parallel module, imported on first use; the one place that knows
    they may be missing (the runner checks before it starts ranks, the ranks call through here)."""
    try:
        return importlib.import_module(f"executor.training.{name}")
    except ModuleNotFoundError as e:
        if e.name != f"executor.training.{name}":
            raise
        raise SpecError(EXTENSIONS[name], value,
                        "tensor/pipeline parallel runs need executor/training/tensor_parallel.py "
                        "and executor/training/pipeline.py, which this checkout does not have yet; "
                        "run plans with tp = pp = 1 (or validate with --dry-run)") from None


def require_extensions(degrees: ParallelDegrees) -> None:
    if degrees.tp > 1:
        parallel_extension("tensor_parallel", degrees.tp)
    if degrees.pp > 1:
        parallel_extension("pipeline", degrees.pp)


# --- what the runner can run ---------------------------------------------------------------


def _offload_field(plan: TrainingPlan, stage: int, kind: str) -> str:
    own = plan.stages is not None and plan.stages[stage].offload is not None
    return f"plan.stages[{stage}].offload.{kind}" if own else f"plan.offload.{kind}"


def check_runnable(plan: TrainingPlan, degrees: ParallelDegrees) -> None:
    """Raise SpecError for a plan the runner would have to approximate."""
    if plan.precision != "bf16":
        raise SpecError("plan.precision", plan.precision,
                        "the runner computes in its dtype option (bf16 or fp32); fp8 GEMMs are not implemented")
    for i, (zero, offload) in enumerate(zip(plan.stage_zero(), plan.stage_offload())):
        for kind in OFFLOAD_KINDS:
            value = getattr(offload, kind)
            if value not in (0.0, 1.0):
                raise SpecError(_offload_field(plan, i, kind), value,
                                "the runner offloads only whole (1.0) or no (0.0) state: FSDP2's "
                                "CPUOffloadPolicy and saved-tensor hooks move whole tensors, and "
                                "rounding would run another plan than the one predicted")
        for kind in ("weights", "gradients"):
            if getattr(offload, kind) and not (fsdp_offload(offload) and zero >= 2):
                raise SpecError(_offload_field(plan, i, kind), getattr(offload, kind),
                                f"offloading {kind} needs weights, gradients and optimizer all at 1.0 "
                                f"with zero_stage 2 or 3 (FSDP2's CPUOffloadPolicy moves the three "
                                f"together); this stage has zero_stage {zero}")
        if degrees.hsdp and zero != 3:
            field = f"plan.stages[{i}].zero_stage" if plan.stages else "plan.zero_stage"
            raise SpecError(field, zero, "HSDP (dp_shard < dp) needs zero_stage 3 on every stage")


def apply_activation_offload(module: nn.Module, fraction: float, device_type: str) -> None:
    """Keep the tensors `module`'s backward needs in host memory (a no-op copy on a CPU device)."""
    if fraction:
        pin = device_type == "cuda"
        around_forward(module, lambda: torch.autograd.graph.save_on_cpu(pin_memory=pin, device_type=device_type))


# --- 4: data parallel ----------------------------------------------------------------------


def apply_data_parallel(module: nn.Module, zero: int, offload: Offload, plan: TrainingPlan,
                        degrees: ParallelDegrees, mesh: DeviceMesh, in_place: bool) -> nn.Module:
    """DDP (ZeRO-0/1) or FSDP2 (ZeRO-2/3, HSDP, CPU offload) over the data-parallel mesh."""
    dp_mesh = degrees.dp_mesh(mesh)
    if zero >= 2 and (degrees.dp > 1 or fsdp_offload(offload)):
        kw = {"mesh": dp_mesh, "reshard_after_forward": zero == 3 and plan.reshard_after_forward,
              "offload_policy": CPUOffloadPolicy(pin_memory=mesh.device_type == "cuda")
              if fsdp_offload(offload) else OffloadPolicy()}
        for block in module.blocks.children():
            fully_shard(block, **kw)
        fully_shard(module, **kw)
        return module
    if degrees.dp == 1:
        return module
    if in_place:
        from torch.distributed._composable.replicate_with_fsdp import replicate

        replicate(module, mesh=dp_mesh)
        return module
    device_ids = [torch.cuda.current_device()] if mesh.device_type == "cuda" else None
    return DistributedDataParallel(module, process_group=dp_mesh.get_group(), device_ids=device_ids,
                                   gradient_as_bucket_view=True)  # no second copy of the gradients


@contextmanager
def gradient_accumulation(model: nn.Module, plan: TrainingPlan, last: bool) -> Iterator[None]:
    """Around one micro-batch's forward and backward: reduce gradients only after the last one
    (DDP), or every time unless the plan keeps ZeRO-3 weights gathered between micro-batches."""
    if isinstance(model, DistributedDataParallel) and not last:
        with model.no_sync():
            yield
        return
    if isinstance(model, FSDPModule) and not plan.reshard_between_microbatches:
        model.set_requires_gradient_sync(last)
        model.set_reshard_after_backward(last)
    yield


def parallelize(module: nn.Module, plan: TrainingPlan, degrees: ParallelDegrees, mesh: DeviceMesh, *,
                stage: int, checkpointed: int, in_place: bool = False) -> nn.Module:
    """Apply the plan to one local module of pipeline stage `stage`: TP -> checkpointing ->
    activation offload -> data parallel. Returns the module to call (a DDP wrapper, or
    `module` itself, changed in place)."""
    zero, offload = plan.stage_zero()[stage], plan.stage_offload()[stage]
    if degrees.tp > 1:  # 1. shard the linears (DTensor), before anything wraps them
        tp = parallel_extension("tensor_parallel", degrees.tp)
        tp.apply_tensor_parallel(module, degrees.tp_mesh(mesh), plan.sequence_parallel)
    apply_activation_checkpointing(module.blocks, checkpointed, plan.recompute)  # 2.
    apply_activation_offload(module, offload.activations, mesh.device_type)  # 3.
    return apply_data_parallel(module, zero, offload, plan, degrees, mesh,  # 4. last: wraps the rest
                               in_place=in_place or degrees.tp > 1)


# --- the optimizer ---------------------------------------------------------------------------
