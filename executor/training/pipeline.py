"""Pipeline parallelism of the decoder: the plan's stages as `torch.distributed.pipelining` stages.

    plan.stage_layers ──► layers of every (rank, chunk), as the simulator splits them
                          (`chunk_layers`; the same rule as `TrainingCostModel._chunks`)
    global stage g = chunk * pp + rank  (Megatron's and torch's "loop" interleaving)
    ──► StageModule per local chunk: embedding on stage 0, final norm + LM head on the last
    ──► PipelineStage (static shapes) ──► ScheduleGPipe | Schedule1F1B | ScheduleInterleaved1F1B
    ──► PipelineRunner.step(tokens, targets): forward + backward of one iteration's batch

Stage modules keep the decoder's parameter names (`embed.weight`, `blocks.7.q.weight`,
`head.weight`), so a stage's state dict is a slice of a full `Decoder`'s. Their weights are
drawn per parameter from (seed, name) (`init_weights`), so the same seed gives the same model
whatever the pipeline layout; a single-process `Decoder` initialized by `init_weights` is the
reference the tests compare with.

Tied embeddings (GPT): like Megatron-LM, the last stage keeps its own copy of the embedding
matrix as `head.weight`, initialized equal to `embed.weight`; after every backward the first
and last stage swap the two gradients and both add them, so both copies receive the tied
weight's gradient and stay equal under the same optimizer. That copy is counted: the last
stage's parameters include vocab x hidden for the head, as the simulator counts them
(`StageModel.extra_params`: "Megatron keeps a tied copy on the last stage").

Loss: cross-entropy averaged over each micro-batch's tokens, and over the micro-batches
(`scale_grads=True` divides the accumulated gradients by their count), so loss and gradients
equal those of the whole batch's mean loss in one process.

Tensor parallelism composes from outside: apply `apply_tensor_parallel(m, tp_mesh,
plan.sequence_parallel)` to every module of `runner.modules` before the first step. The
stages are built for the activation shape that implies (the local sequence shard
[micro_batch, seq / tp, hidden] between stages with sequence parallel, as Megatron sends).
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.pipelining import (
    PipelineStage,
    Schedule1F1B,
    ScheduleGPipe,
    ScheduleInterleaved1F1B,
)

from executor.training.model import Block, RMSNorm
from executor.training.tensor_parallel import reduce_partial_grads
from simulator.specs.model import TransformerSpec
from simulator.specs.plan import TrainingPlan

SCHEDULES = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}


def chunk_layers(spec: TransformerSpec, plan: TrainingPlan) -> list[list[int]]:
    """Layers of each chunk of each pipeline rank, [rank][chunk], as the simulator assigns them:
    rank r's `plan.stage_layers` split over its virtual_stages chunks, the first ones one
    layer larger when they do not divide."""
    v = plan.virtual_stages
    return [[n // v + (c < n % v) for c in range(v)] for n in plan.stage_layers(spec)]


def stage_layer_ids(spec: TransformerSpec, plan: TrainingPlan) -> list[range]:
    """The decoder layers of every global stage g = chunk * pp + rank, in model order."""
    per_chunk = chunk_layers(spec, plan)
    sizes = [per_chunk[g % plan.pp][g // plan.pp] for g in range(plan.pp * plan.virtual_stages)]
    starts = [sum(sizes[:g]) for g in range(len(sizes))]
    return [range(start, start + n) for start, n in zip(starts, sizes)]


class StageModule(nn.Module):
    """Some consecutive blocks of the decoder, with the embedding if `first` and the final norm
    and LM head if `last`; takes tokens (first) or hidden states, returns hidden states or
    logits (last)."""

    def __init__(self, spec: TransformerSpec, layer_ids: range, first: bool, last: bool):
        super().__init__()
        h = spec.hidden_size
        self.embed = nn.Embedding(spec.vocab_size, h) if first else None
        learned = first and spec.position_embedding == "learned"
        self.pos = nn.Embedding(spec.seq_length, h) if learned else None
        self.blocks = nn.ModuleDict({str(i): Block(spec) for i in layer_ids})
        norm = nn.LayerNorm(h) if spec.norm == "layernorm" else RMSNorm(h)
        self.norm = norm if last else None
        self.head = nn.Linear(h, spec.vocab_size, bias=False) if last else None
        if first and last and spec.tied_embeddings:
            self.head.weight = self.embed.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.embed is not None:
            tokens, x = x, self.embed(x)
            if self.pos is not None:
                x = x + self.pos(torch.arange(tokens.shape[1], device=tokens.device))
        for block in self.blocks.values():
            x = block(x)
        if self.head is not None:
            x = self.head(self.norm(x))
        return x


def init_weights(module: nn.Module, seed: int, tied_embeddings: bool) -> None:
    """Initialize in place, each parameter from its own generator seeded by (seed, name).

    Matrices as `Decoder` draws them (normal, std 1/sqrt(fan_in)); norm weights one; biases
    zero (Megatron's; `Decoder` keeps nn.Linear's uniform biases). With tied embeddings the
    head's matrix is drawn as `embed.weight`, so a separate copy on the last stage starts equal.
    """
    seen = set()
    with torch.no_grad():
        for name, p in module.named_parameters(remove_duplicate=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            key = "embed.weight" if tied_embeddings and name == "head.weight" else name
            if p.dim() == 2:
                gen = torch.Generator(p.device).manual_seed(seed * 1_000_003 + zlib.crc32(key.encode()))
                p.normal_(0.0, 1.0 / math.sqrt(p.shape[1]), generator=gen)
            elif name.endswith("bias"):
                p.zero_()
            else:  # LayerNorm / RMSNorm weight
                p.fill_(1.0)


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token loss of one micro-batch (fp32 logits)."""
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


@dataclass
class PipelineRunner:
    """This rank's stages of one pipeline and their schedule."""

    schedule: ScheduleGPipe | Schedule1F1B | ScheduleInterleaved1F1B
    stages: list[PipelineStage]
    modules: list[StageModule]  # local chunks in chunk order (for the optimizer, FSDP, TP)
    has_first: bool  # this rank holds global stage 0 (takes the tokens)
    has_last: bool  # this rank holds the last stage (takes the targets, returns the loss)
    tied_peer: int | None  # global rank holding the other copy of a tied embedding
    group: dist.ProcessGroup

    def step(self, tokens: torch.Tensor, targets: torch.Tensor) -> float | None:
        """Forward and backward of one iteration: `tokens` and `targets` are this pipeline's
        [num_microbatches * micro_batch_size, seq] batch (read only where needed). Gradients
        accumulate into .grad (zero them between steps) and are complete on return:
        averaged over micro-batches, Partial TP sums taken, tied copies summed. Returns the
        mean loss on the rank of the last stage, None elsewhere."""
        losses: list[torch.Tensor] = []
        args = (tokens,) if self.has_first else ()
        target = targets if self.has_last else None
        self.schedule.step(*args, target=target, losses=losses if self.has_last else None,
                           return_outputs=False)
        reduce_partial_grads(self.modules)  # sequence-parallel norms, once tensor parallel
        if self.tied_peer is not None:
            self._sum_tied_grads()
        return torch.stack(losses).mean().item() if self.has_last else None

    def _sum_tied_grads(self) -> None:
        """Swap the embedding's gradient with the head copy's and add them (Megatron's
        embedding group all-reduce, with two ranks as one send and one receive)."""
        weight = self.modules[0].embed.weight if self.has_first else self.modules[-1].head.weight
        grad = weight.grad
        local = grad.to_local() if hasattr(grad, "to_local") else grad  # FSDP-sharded: same layout both ends
        other = torch.empty_like(local)
        ops = [dist.P2POp(dist.isend, local.contiguous(), self.tied_peer, self.group),
               dist.P2POp(dist.irecv, other, self.tied_peer, self.group)]
        for work in dist.batch_isend_irecv(ops):
            work.wait()
        local.add_(other)


def build_pipeline(spec: TransformerSpec, plan: TrainingPlan, pp_group_or_mesh: dist.ProcessGroup | DeviceMesh,
                   pp_rank: int, device: torch.device | str, dtype: torch.dtype = torch.float32,
                   seed: int = 0) -> PipelineRunner:
    """This pipeline rank's stage modules, stages and schedule for `plan` (pp >= 2).

    `pp_group_or_mesh` holds the plan.pp ranks of this pipeline (a group or a 1-D mesh) and
    `pp_rank` is this rank's place in it. Micro-batches per step: plan.num_microbatches.
    """
    if plan.pp < 2:
        raise ValueError(f"pp = {plan.pp}: build_pipeline needs pp >= 2")
    group = pp_group_or_mesh.get_group() if isinstance(pp_group_or_mesh, DeviceMesh) else pp_group_or_mesh
    device = torch.device(device)
    pp, n_stages = plan.pp, plan.pp * plan.virtual_stages
    layer_ids = stage_layer_ids(spec, plan)
    mb, seq = plan.micro_batch_size, plan.seq(spec)
    if plan.sequence_parallel and seq % plan.tp:
        raise ValueError(f"sequence_parallel: tp = {plan.tp} must divide the sequence length {seq}")
    between = seq // plan.tp if plan.sequence_parallel else seq  # Megatron sends the local shard
    hidden = torch.empty(mb, between, spec.hidden_size, dtype=dtype, device="meta", requires_grad=True)
    stages, modules = [], []
    for g in range(pp_rank, n_stages, pp):
        first, last = g == 0, g == n_stages - 1
        with torch.device("meta"):
            module = StageModule(spec, layer_ids[g], first, last)
        module.to_empty(device=device)
        init_weights(module, seed, spec.tied_embeddings)
        module.to(dtype)
        inputs = torch.empty(mb, seq, dtype=torch.long, device="meta") if first else hidden
        outputs = torch.empty(mb, seq, spec.vocab_size, dtype=dtype, device="meta") if last else hidden
        stages.append(PipelineStage(module, g, n_stages, device, input_args=inputs, output_args=outputs,
                                    group=group))
        modules.append(module)
    m = plan.num_microbatches
    if plan.schedule == "interleaved":
        schedule = ScheduleInterleaved1F1B(stages, m, loss_fn=cross_entropy)
    else:
        schedule = SCHEDULES[plan.schedule](stages[0], m, loss_fn=cross_entropy)
    has_first, has_last = pp_rank == 0, pp_rank == pp - 1
    tied_peer = None
    if spec.tied_embeddings and (has_first or has_last):
        tied_peer = dist.get_global_rank(group, pp - 1 if has_first else 0)
    return PipelineRunner(schedule, stages, modules, has_first, has_last, tied_peer, group)
