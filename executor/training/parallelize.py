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
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from functools import partial
from types import ModuleType
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, OffloadPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel
from torch.overrides import TorchFunctionMode
from torch.utils.checkpoint import (
    CheckpointPolicy,
    checkpoint,
    create_selective_checkpoint_contexts,
)

from executor.training.degrees import ParallelDegrees
from simulator.errors import SpecError
from simulator.specs.model import TransformerSpec
from simulator.specs.plan import Offload, TrainingPlan

RECOMPUTE_ATTR = "simtune_recompute"  # on each recomputing block (or its wrapper): full | selective | selective_op
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


def fsdp_offload(offload: Offload) -> bool:
    """Weights, gradients and optimizer states all in host memory: FSDP2's CPUOffloadPolicy."""
    return offload.weights == offload.gradients == offload.optimizer == 1.0


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


def stage_checkpoints(plan: TrainingPlan, model: TransformerSpec) -> list[list[int]]:
    """Checkpointed layers of each chunk of each stage: the stage's count split over its
    virtual stages as the simulator splits it (`TrainingCostModel._chunks`)."""
    v = plan.virtual_stages
    return [[k // v + (c < k % v) for c in range(v)] for k in plan.stage_checkpointed(model)]


# --- 1-3: tensor parallel, activation checkpointing, activation offload ----------------------

_ATTENTION_CORE = {getattr(torch.ops.aten, name).default for name in (
    "_scaled_dot_product_flash_attention", "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
) if hasattr(torch.ops.aten, name)}
_MATMULS = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default}


class _CheckpointAttentionCore(TorchFunctionMode):
    """Megatron-LM's selective recompute: inside a block's forward, every
    `scaled_dot_product_attention` runs under a non-reentrant checkpoint, so the attention
    core keeps only its inputs and runs again in backward; the rest of the block is untouched.
    (A function mode rather than selective activation checkpointing of the whole block: SAC
    replays the block op by op and breaks on the rotary table a block builds on first use.)"""

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            return checkpoint(func, *args, use_reentrant=False, **kwargs)
        return func(*args, **kwargs)


def _torchtitan_op_policy(counts: dict[str, int], ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
    """torchtitan's per-op policy: keep attention and every other matmul output, re-run the rest."""
    if op in _MATMULS:
        key = "recompute" if ctx.is_recompute else "forward"
        counts[key] += 1
        return CheckpointPolicy.MUST_SAVE if counts[key] % 2 else CheckpointPolicy.PREFER_RECOMPUTE
    return CheckpointPolicy.MUST_SAVE if op in _ATTENTION_CORE else CheckpointPolicy.PREFER_RECOMPUTE


def _op_policy_context():
    return create_selective_checkpoint_contexts(partial(_torchtitan_op_policy, defaultdict(int)))


def _around_forward(module: nn.Module, context: Callable[[], AbstractContextManager]) -> None:
    """Run every forward of `module` inside a fresh `context()` (entered and left by hooks, so
    the module keeps its class and parameter names)."""
    open_contexts = []

    def enter(mod: nn.Module, args: Any) -> None:
        open_contexts.append(context())
        open_contexts[-1].__enter__()

    def leave(mod: nn.Module, args: Any, output: Any) -> None:
        open_contexts.pop().__exit__(None, None, None)

    module.register_forward_pre_hook(enter)
    module.register_forward_hook(leave, always_call=True)


def apply_activation_checkpointing(blocks: nn.ModuleList | nn.ModuleDict, checkpointed: int,
                                   recompute: str) -> None:
    """Checkpoint the first `checkpointed` blocks whole; with selective recompute, make the
    others recompute only their attention core (or torchtitan's op set, `selective_op`).
    `blocks` is a Decoder's ModuleList or a pipeline stage's ModuleDict, in layer order."""
    if not 0 <= checkpointed <= len(blocks):
        raise ValueError(f"checkpointed = {checkpointed}: this chunk has {len(blocks)} layers")
    for i, (name, block) in enumerate(list(blocks.named_children())):
        kind = "full" if i < checkpointed else recompute if recompute.startswith("selective") else "none"
        if kind == "full":
            block = checkpoint_wrapper(block)
        elif kind == "selective_op":
            block = checkpoint_wrapper(block, context_fn=_op_policy_context)
        elif kind == "selective":
            _around_forward(block, _CheckpointAttentionCore)
        else:
            continue
        setattr(block, RECOMPUTE_ATTR, kind)
        blocks.register_module(name, block)


def recompute_kinds(module: nn.Module) -> list[str]:
    """How each block of `module` (a Decoder, a stage chunk, their DDP wrapper, or just their
    blocks) recomputes."""
    inner = getattr(module, "module", module)
    blocks = getattr(inner, "blocks", inner)
    return [getattr(b, RECOMPUTE_ATTR, "none") for b in blocks.children()]


def checkpointed_layers(module: nn.Module) -> int:
    """Blocks of `module` checkpointed whole: what the plan's `checkpointed_layers` counts."""
    return recompute_kinds(module).count("full")


def apply_activation_offload(module: nn.Module, fraction: float, device_type: str) -> None:
    """Keep the tensors `module`'s backward needs in host memory (a no-op copy on a CPU device)."""
    if fraction:
        pin = device_type == "cuda"
        _around_forward(module, lambda: torch.autograd.graph.save_on_cpu(pin_memory=pin, device_type=device_type))


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


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


class HostAdamW(torch.optim.Optimizer):
    """AdamW whose fp32 master weights and moments live in host memory (ZeRO-Offload's split):
    each step copies the gradients to the host, steps there, and copies the weights back.
    With FSDP2 it steps the local shards. Used where the plan offloads only the optimizer."""

    def __init__(self, params: Any, lr: float = 1e-3, **kwargs: Any):
        super().__init__(params, {"lr": lr, **kwargs})
        self.master = {p: _local(p).detach().to("cpu", torch.float32, copy=True)
                       for group in self.param_groups for p in group["params"]}
        self.host = torch.optim.AdamW(
            [{**{k: v for k, v in g.items() if k != "params"}, "params": [self.master[p] for p in g["params"]]}
             for g in self.param_groups])

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:
        for p, master in self.master.items():
            master.grad = None if p.grad is None else _local(p.grad).to("cpu", torch.float32)
        self.host.step()
        for p, master in self.master.items():
            _local(p).copy_(master, non_blocking=True)


class ShardedOptimizer(torch.optim.Optimizer):
    """ZeRO-1 for DTensor parameters (tensor parallel, or `replicate` in a pipeline), which
    `ZeroRedundancyOptimizer` cannot broadcast: each data-parallel rank owns whole parameters
    (greedy by size, as ZeroRedundancyOptimizer partitions), keeps optimizer states only for
    them, steps them, and broadcasts their local tensors to its peers after the step."""

    def __init__(self, params: Any, optimizer_class: type, group: Any, **defaults: Any):
        import torch.distributed as dist

        super().__init__(list(params), defaults)
        self.group, self.params = group, self.param_groups[0]["params"]
        loads = [0] * dist.get_world_size(group)
        self.owner: dict[torch.Tensor, int] = {}
        for p in sorted(self.params, key=lambda p: -p.numel()):  # stable: the same on every rank
            self.owner[p] = loads.index(min(loads))
            loads[self.owner[p]] += p.numel()
        mine = [p for p in self.params if self.owner[p] == dist.get_rank(group)]
        self.local = optimizer_class(mine, **defaults) if mine else None

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:
        import torch.distributed as dist

        if self.local is not None:
            self.local.step()
        for p in self.params:
            dist.broadcast(_local(p), src=dist.get_global_rank(self.group, self.owner[p]), group=self.group)


def build_optimizer(modules: Sequence[nn.Module], plan: TrainingPlan, stage: int,
                    degrees: ParallelDegrees, mesh: DeviceMesh, lr: float) -> torch.optim.Optimizer:
    """AdamW over the local modules: sharded over data parallel for ZeRO-1 (ZeroRedundancyOptimizer
    over DDP; `ShardedOptimizer` over DTensors), on the host where the plan offloads the
    optimizer alone (FSDP2's offload steps the host shards directly)."""
    params = list(dict.fromkeys(p for m in modules for p in m.parameters()))
    offload, zero = plan.stage_offload()[stage], plan.stage_zero()[stage]
    cls = HostAdamW if offload.optimizer and not fsdp_offload(offload) else torch.optim.AdamW
    if zero == 1 and degrees.dp > 1:
        from torch.distributed.optim import ZeroRedundancyOptimizer

        group = degrees.dp_mesh(mesh).get_group()
        if any(isinstance(p, DTensor) for p in params):
            return ShardedOptimizer(params, cls, group, lr=lr)
        return ZeroRedundancyOptimizer(params, optimizer_class=cls, lr=lr, process_group=group)
    return cls(params, lr=lr)
