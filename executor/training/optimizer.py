"""The optimizers a plan's data parallelism needs beyond plain AdamW.

`HostAdamW` keeps fp32 master weights and AdamW states in host memory when the plan offloads
only the optimizer; `ShardedOptimizer` is ZeRO-1 for parameters that are DTensors (tensor or
pipeline parallel), which `ZeroRedundancyOptimizer` cannot broadcast; `build_optimizer`
chooses among them and AdamW for a stage's modules.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor

from executor.training.degrees import ParallelDegrees
from simulator.specs.plan import Offload, TrainingPlan


def fsdp_offload(offload: Offload) -> bool:
    """Weights, gradients and optimizer states all in host memory: FSDP2's CPUOffloadPolicy."""
    return offload.weights == offload.gradients == offload.optimizer == 1.0


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
