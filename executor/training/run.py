"""run_training: run a training plan on this machine's devices and measure it against the simulator.

    specs (model, cluster, plan)
      -> checks: validate_plan, ParallelDegrees, check_runnable   (SpecError naming the field)
      -> dry run: meta-device stages, parameter count == the simulator's, its memory estimate
      -> or: tp x pp x dp ranks (run_ranks: gloo on CPU, NCCL on GPU; or the ranks torchrun started)
           each rank: mesh -> seeded Decoder (or its pipeline stage) -> parallelize -> AdamW
                      -> warm-up steps, then timed steps (profiler.timers.Timer) -> its numbers
      -> TrainingRunReport (+ the simulator's prediction and the error with compare/profile)

Every rank draws the same weights from the seed, each parameter from (seed, its name)
(`pipeline.init_weights`, so the model is the same under any layout, pipelined or not), and
trains on the same synthetic batch of each step (arithmetic token sequences, so the loss
falls and a wrong gradient shows), taking its data-parallel slice of it; a single process
with the whole batch therefore computes the same losses, which is what the tests compare
against.

Measured numbers:
- `step_time_s`: the median over the timed steps of the slowest rank (each rank's steps are
  timed by `Timer`: wall clock on CPU, CUDA events on GPU), after `warmup` untimed steps.
- `peak_memory_bytes`, per rank: `torch.cuda.max_memory_allocated` on GPU. On CPU there is
  no allocator to ask, so it is the process's peak resident set (VmHWM, reset through
  /proc/self/clear_refs just before the model is built) minus its resident set at that
  moment: what building and training the model added, allocator slack and gloo buffers
  included.
- `losses`: the global batch's mean loss of every step, warm-up included.

What the plan says and the runner takes as given: the runner computes in `dtype` (bf16 by
default: weights, activations, gradients and AdamW states; fp32 for exact tests) rather than
mixed precision with fp32 master weights, so `gradient_dtype` is the weights' dtype; the
decoder is eager PyTorch with flash (SDPA) attention whatever `fused_elementwise` and
`flash_attention` say; DDP always overlaps its gradient all-reduce with backward.

A test hook: with SIMTUNE_RUN_FAIL_RANK=r in the environment, rank r raises at its second
step (its peers are then inside a collective), to check that a failing rank ends the run.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch

from executor.training.checkpointing import (
    apply_activation_checkpointing,
    checkpointed_layers,
    stage_checkpoints,
)
from executor.training.degrees import ParallelDegrees
from executor.training.model import Decoder
from executor.training.parallelize import (
    check_runnable,
    require_extensions,
)
from executor.training.rank import DTYPES, RankJob, stage_parameters, train_rank
from profiler.ranks import run_ranks
from simulator.errors import SpecError
from simulator.specs.catalog import load_cluster, load_model, load_plan
from simulator.specs.model import TransformerSpec
from simulator.specs.plan import TrainingPlan, validate_plan
from simulator.training import simulate_training
from simulator.training.costs import TrainingCostModel


@dataclass
class TrainingRunReport:
    """Measured (and, with compare or a profile, predicted) numbers of one run or dry run."""

    model: str
    cluster: str
    plan: dict[str, Any]
    degrees: dict[str, int]
    device: str                                # cpu | cuda
    dtype: str
    dry_run: bool
    steps: int
    warmup: int
    tokens_per_iteration: int
    parameters: int                            # counted on the built modules, all stages
    checkpointed_layers: list[int]             # per stage, counted on the built modules
    backend: str | None = None                 # gloo | nccl (None: dry run)
    launcher: str | None = None                # spawn | torchrun
    step_time_s: float | None = None           # median of the slowest rank, after warm-up
    step_time_p10_s: float | None = None
    step_time_p90_s: float | None = None
    tokens_per_s: float | None = None
    peak_memory_bytes: list[float] = field(default_factory=list)  # per rank
    peak_memory_source: str | None = None
    losses: list[float] = field(default_factory=list)             # per step, warm-up included
    predicted_parameters: int | None = None    # the simulator's symbolic count (dry run)
    predicted_step_time_s: float | None = None
    predicted_tokens_per_s: float | None = None
    predicted_peak_memory_bytes: float | None = None
    predicted_breakdown: dict[str, float] = field(default_factory=dict)
    cost_sources: dict[str, str] = field(default_factory=dict)   # cost -> datasheet | measured ...
    error: float | None = None                 # measured / predicted step time - 1

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --- the parent: checks, launch, report ------------------------------------------------------


def run_training(model: Any, cluster: Any, plan: Any, steps: int = 5, warmup: int = 2, seed: int = 0,
                 dry_run: bool = False, *, compare: bool = False, profile: str | Path | None = None,
                 dtype: str = "bf16", timeout_s: float = 600.0) -> TrainingRunReport:
    """Run `plan` for warmup + steps iterations (or only check it, `dry_run`) and measure it.

    Each spec argument is a spec, a catalog name, a path or a mapping. `compare` (or a
    `profile`) adds the simulator's prediction for the cluster with that profile (default:
    the cluster's own). Raises SpecError for a plan the runner cannot run, `RankError`
    naming the rank when a rank fails, TimeoutError past `timeout_s`.
    """
    model_spec, cluster_spec, plan_spec = load_model(model), load_cluster(cluster), load_plan(plan)
    validate_plan(plan_spec, model_spec, cluster_spec)
    degrees = ParallelDegrees.of(plan_spec, cluster_spec)
    check_runnable(plan_spec, degrees)
    if dtype not in DTYPES:
        raise SpecError("dtype", dtype, f"allowed: {', '.join(DTYPES)}")
    if steps < 1 or warmup < 0:
        raise SpecError("steps", (steps, warmup), "need steps >= 1 timed steps and warmup >= 0")
    device_type = "cpu" if cluster_spec.device.name == "cpu" else "cuda"
    spec = run_spec(model_spec, plan_spec)
    report = TrainingRunReport(
        model=model_spec.name, cluster=cluster_spec.name, plan=plan_spec.to_dict(),
        degrees=degrees.to_dict(), device=device_type, dtype=dtype, dry_run=dry_run, steps=steps,
        warmup=warmup, tokens_per_iteration=plan_spec.global_batch_size * spec.seq_length,
        parameters=0, checkpointed_layers=[])
    if dry_run:
        _dry_run(report, spec, cluster_spec, plan_spec)
    else:
        require_extensions(degrees)
        job = RankJob(spec, plan_spec, degrees, device_type, dtype, steps, warmup, seed)
        _measure(report, job, timeout_s)
    if dry_run or compare or profile is not None:
        _predict(report, model_spec, cluster, plan_spec, profile)
    return report


def run_spec(model: TransformerSpec, plan: TrainingPlan) -> TransformerSpec:
    """The model at the plan's sequence length (the position table the simulator counts)."""
    return model.model_copy(update={"seq_length": plan.seq(model)})


def _measure(report: TrainingRunReport, job: RankJob, timeout_s: float) -> None:
    backend = "gloo" if job.device_type == "cpu" else "nccl"
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        results, report.launcher = _under_torchrun(job, backend, timeout_s), "torchrun"
    else:
        threads = 1 if job.device_type == "cpu" else max(1, (os.cpu_count() or 1) // job.degrees.world_size)
        results = run_ranks(train_rank, job.degrees.world_size, backend, threads, (job,), timeout_s)
        report.launcher = "spawn"
    slowest = max(results, key=lambda r: r["step_time_s"])
    losses = [r["losses"] for r in results if r["losses"] is not None]  # last pipeline stage
    heads = sorted((r["stage"], r) for r in results if r["first_of_stage"])
    report.backend = backend
    report.step_time_s = slowest["step_time_s"]
    report.step_time_p10_s, report.step_time_p90_s = slowest["step_time_p10_s"], slowest["step_time_p90_s"]
    report.tokens_per_s = report.tokens_per_iteration / report.step_time_s
    report.peak_memory_bytes = [r["peak_memory_bytes"] for r in results]
    report.peak_memory_source = results[0]["peak_memory_source"]
    report.losses = [sum(step) / len(step) for step in zip(*losses)]
    report.parameters = sum(r["parameters"] for _, r in heads)
    report.checkpointed_layers = [r["checkpointed_layers"] for _, r in heads]


def _under_torchrun(job: RankJob, backend: str, timeout_s: float) -> list[dict[str, Any]]:
    """This process is one rank that torchrun started: run it, share every rank's numbers."""
    import torch.distributed as dist

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if world != job.degrees.world_size:
        raise SpecError("plan", f"tp={job.plan.tp} pp={job.plan.pp} dp={job.plan.dp}",
                        f"needs {job.degrees.world_size} ranks; torchrun started {world}")
    if not dist.is_initialized():
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    result = train_rank(rank, world, job)
    results: list[Any] = [None] * world
    dist.all_gather_object(results, result)
    return results


def _predict(report: TrainingRunReport, model: TransformerSpec, cluster: Any, plan: TrainingPlan,
             profile: str | Path | None) -> None:
    predicted = simulate_training(model, load_cluster(cluster, profile), plan)
    report.predicted_step_time_s = predicted.iteration_time_s
    report.predicted_tokens_per_s = predicted.tokens_per_s
    report.predicted_peak_memory_bytes = predicted.peak_memory_bytes
    report.predicted_breakdown = dict(predicted.breakdown)
    report.cost_sources = dict(predicted.cost_sources)
    if report.step_time_s is not None:
        report.error = report.step_time_s / predicted.iteration_time_s - 1.0


def _dry_run(report: TrainingRunReport, spec: TransformerSpec, cluster: Any, plan: TrainingPlan) -> None:
    """Build every stage on the meta device: its checkpointed layers and parameters, checked
    against the simulator's symbolic count (for the whole model: tp = 1)."""
    symbolic = TrainingCostModel(spec, plan.model_copy(update={"tp": 1, "sequence_parallel": False}), cluster)
    v, counted, expected = plan.virtual_stages, 0, 0.0
    for i, (n, chunks) in enumerate(zip(plan.stage_layers(spec), stage_checkpoints(plan, spec))):
        first, last = i == 0, i == plan.pp - 1
        with torch.device("meta"):
            decoder = Decoder(spec, layers=n)
        sizes = [n // v + (c < n % v) for c in range(v)]  # the chunks of an interleaved stage
        ckpt = 0
        for c, k in enumerate(chunks):
            chunk = decoder.blocks[sum(sizes[:c]):sum(sizes[:c + 1])]
            apply_activation_checkpointing(chunk, k, plan.recompute)
            ckpt += checkpointed_layers(chunk)
        report.checkpointed_layers.append(ckpt)
        counted += stage_parameters(decoder, first, last)
        expected += symbolic.stage_params(n, first, last)
    report.parameters, report.predicted_parameters = counted, round(expected)
    if counted != report.predicted_parameters:
        raise RuntimeError(f"{spec.name}: the stages built hold {counted:,} parameters, the simulator "
                           f"counts {report.predicted_parameters:,}; the two models disagree")
