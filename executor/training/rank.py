"""One rank of a training run: build its part of the model, parallelize it, train and time it.

`train_rank(rank, world_size, job)` is what `run_training` starts on every rank (through
`profiler.ranks.run_ranks`, or directly under torchrun). The rank builds the mesh, its seeded
`Decoder` or pipeline stage, applies `parallelize`, and runs warm-up and timed steps on the
step's synthetic batch (its data-parallel slice), returning its step times, losses and peak
memory to the parent.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from executor.training.checkpointing import (
    checkpointed_layers,
    stage_checkpoints,
)
from executor.training.degrees import ParallelDegrees
from executor.training.model import Decoder
from executor.training.optimizer import build_optimizer
from executor.training.parallelize import (
    gradient_accumulation,
    parallel_extension,
    parallelize,
)
from profiler.timers import Timer
from simulator.specs.model import TransformerSpec
from simulator.specs.plan import TrainingPlan

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
LEARNING_RATE = 1e-3
FAIL_RANK_ENV = "SIMTUNE_RUN_FAIL_RANK"


@dataclass(frozen=True)
class RankJob:
    """What every rank needs (picklable: it travels to spawned ranks)."""

    spec: TransformerSpec
    plan: TrainingPlan
    degrees: ParallelDegrees
    device_type: str
    dtype: str
    steps: int
    warmup: int
    seed: int


def stage_parameters(decoder: Decoder, first: bool, last: bool) -> int:
    """Parameters a pipeline stage holds: its blocks, the embeddings on the first, the final
    norm and LM head on the last (a tied head is a copy there unless it is also the first)."""
    parts = [decoder.blocks]
    if first:
        parts += [decoder.embed, decoder.pos] if decoder.pos is not None else [decoder.embed]
    if last:
        parts += [decoder.norm, decoder.head]
    return sum(p.numel() for p in dict.fromkeys(p for part in parts for p in part.parameters()))


# --- one rank --------------------------------------------------------------------------------


def synthetic_batch(spec: TransformerSpec, rows: int, step: int, seed: int) -> torch.Tensor:
    """[rows, seq + 1] tokens of step `step`: arithmetic sequences mod the vocabulary (a random
    start and stride per row), the same on every rank."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    start = torch.randint(0, spec.vocab_size, (rows, 1), generator=g)
    stride = torch.randint(1, 8, (rows, 1), generator=g)
    return (start + stride * torch.arange(spec.seq_length + 1)) % spec.vocab_size


def loss_of(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


class PeakMemory:
    """This rank's peak memory from now on (see the module docstring for what it counts on CPU)."""

    def __init__(self, device: torch.device):
        self.device = device
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            self.source = "torch.cuda.max_memory_allocated"
            return
        try:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
            self.source = "VmHWM - VmRSS before the model was built"
        except OSError:
            self.source = "VmHWM (not resettable here) - VmRSS before the model was built"
        self.base = self._status("VmRSS")

    @staticmethod
    def _status(key: str) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
        raise RuntimeError(f"/proc/self/status has no {key}")

    def peak_bytes(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device)
        return self._status("VmHWM") - self.base


def train_rank(rank: int, world_size: int, job: RankJob) -> dict[str, Any]:
    """One rank: build, parallelize, train warmup + steps steps, and report its numbers."""
    plan, degrees, spec = job.plan, job.degrees, job.spec
    where = degrees.coords(rank)
    device = torch.device("cpu")
    if job.device_type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
    mesh = degrees.build_mesh(job.device_type)
    memory = PeakMemory(device)
    torch.manual_seed(job.seed)
    if degrees.pp > 1:
        runner = parallel_extension("pipeline", degrees.pp).build_pipeline(
            spec, plan, degrees.pp_mesh(mesh), where.pp, device, dtype=DTYPES[job.dtype], seed=job.seed)
        for m, k in zip(runner.modules, stage_checkpoints(plan, spec)[where.pp]):
            parallelize(m, plan, degrees, mesh, stage=where.pp, checkpointed=k, in_place=True)
        modules, forward_backward = list(runner.modules), runner.step
    else:
        # the same per-name draw as every pipeline layout
        from executor.training.pipeline import init_weights

        decoder = Decoder(spec).to(device)
        init_weights(decoder, job.seed, spec.tied_embeddings)
        decoder.to(DTYPES[job.dtype])
        model = parallelize(decoder, plan, degrees, mesh, stage=0, checkpointed=stage_checkpoints(plan, spec)[0][0])
        modules = [decoder]

        def forward_backward(tokens: torch.Tensor, targets: torch.Tensor) -> float:
            n, b = plan.num_microbatches, plan.micro_batch_size
            total = torch.zeros((), device=device)
            for i in range(n):
                with gradient_accumulation(model, plan, last=i == n - 1):
                    loss = loss_of(model(tokens[i * b:(i + 1) * b]), targets[i * b:(i + 1) * b]) / n
                    loss.backward()
                total += loss.detach()
            return float(total)

    optimizer = build_optimizer(modules, plan, where.pp, degrees, mesh, LEARNING_RATE)
    rows = plan.global_batch_size // degrees.dp
    batches = [synthetic_batch(spec, plan.global_batch_size, s, job.seed)[where.dp * rows:(where.dp + 1) * rows]
               .to(device) for s in range(job.warmup + job.steps)]
    fail = os.environ.get(FAIL_RANK_ENV) == str(rank)
    losses: list[float | None] = []

    def step() -> None:
        if fail and len(losses) == 1:
            raise RuntimeError(f"rank {rank} fails on purpose at step 1 ({FAIL_RANK_ENV}={rank})")
        batch = batches[len(losses)]
        losses.append(forward_backward(batch[:, :-1], batch[:, 1:]))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    timing = Timer(str(device), warmup=job.warmup, reps=job.steps, min_reps=job.steps, budget_s=0.0).measure(step)
    return {
        "rank": rank, "stage": where.pp, "first_of_stage": where.dp == 0 and where.tp == 0,
        "step_time_s": timing.median_s, "step_time_p10_s": timing.p10_s, "step_time_p90_s": timing.p90_s,
        "losses": None if losses[0] is None else losses,
        "peak_memory_bytes": memory.peak_bytes(), "peak_memory_source": memory.source,
        "parameters": sum(p.numel() for p in dict.fromkeys(p for m in modules for p in m.parameters())),
        "checkpointed_layers": sum(checkpointed_layers(m) for m in modules),
    }
