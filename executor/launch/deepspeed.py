"""DeepSpeed: `deepspeed_config.json` (batching, ZeRO, offloading, activation checkpointing).

JSON has no comments, so the header and the approximations go to `deepspeed_config.notes.txt`
beside it. The config cannot set tensor or pipeline parallelism (those come from
Megatron-DeepSpeed's mpu and from `deepspeed.pipe.PipelineModule` in the training script),
nor which layers recompute; it can offload a fraction of the optimizer only under ZeRO-3
(`offload_optimizer.ratio`), and parameters only under ZeRO-3 and all or nothing.

With pipeline parallelism DeepSpeed's pipeline engine accepts only ZeRO stages 0 and 1: a
plan with ZeRO-2/3 on any stage is written as ZeRO-1 and the extra memory is recorded.

Sharded data parallel: ZeRO-3 is `zero_optimization.stage` 3. DeepSpeed has no HSDP; the
plan's `dp_shard` is written as ZeRO++'s hierarchical partitioning (`zero_hpz_partition_size`),
which is a different thing: it keeps a second copy of the 16-bit weights sharded over groups
of dp_shard ranks and serves the backward all-gathers from it, while the forward all-gathers,
the gradient reduce-scatters and the optimizer states still span all dp ranks. ZeRO-3 always
re-gathers for the recompute of checkpointed layers, reshards after every module's forward
and reduce-scatters gradients every micro-batch; fp8 linears need Transformer Engine in the
model code. Each of these differences is recorded.
"""

from __future__ import annotations

import json
from pathlib import Path

from executor.launch.base import Approximations, LaunchFile, header, stage_offload
from simulator.specs.hardware import ClusterSpec
from simulator.specs.model import TransformerSpec
from simulator.specs.plan import TrainingPlan

ENGINE = "deepspeed"
REDUCE_BUCKET_BYTES = 500_000_000  # DeepSpeed's default, written so the file is self-describing


def write(model: TransformerSpec, cluster: ClusterSpec, plan: TrainingPlan) -> list[LaunchFile]:
    approx = Approximations("DeepSpeed")
    zero = _zero_stage(plan, approx)
    # DeepSpeedConfig checks train_batch_size = micro-batch x accumulation x data-parallel
    # size, the last from the model-parallel unit (mpu): world / (tp x pp) = dp
    assert plan.global_batch_size == plan.micro_batch_size * plan.num_microbatches * plan.dp
    config = {
        "train_batch_size": plan.global_batch_size,
        "train_micro_batch_size_per_gpu": plan.micro_batch_size,
        "gradient_accumulation_steps": plan.num_microbatches,
        "bf16": {"enabled": True},
        "data_types": {"grad_accum_dtype": plan.gradient_dtype},
        "zero_optimization": _zero(plan, zero, approx),
        "activation_checkpointing": _activations(model, plan, approx),
    }
    if zero == 3:
        _sharding(model, plan, config["zero_optimization"], approx)
    if plan.precision == "fp8":
        approx.add("DeepSpeed's config has no fp8 linears: precision fp8"
                   + (" with fp8_all_gather" if plan.fp8_all_gather else "")
                   + " needs Transformer Engine layers in the model code; the config trains in bf16")
    _parallel_notes(model, plan, zero, approx)
    notes = header("DeepSpeed (deepspeed_config.json)", model, cluster, plan, approx, prefix="")
    notes += (
        "JSON has no comments: these notes stand in for them.\n"
        "Pass the config with --deepspeed_config deepspeed_config.json. DeepSpeed checks\n"
        f"train_batch_size {plan.global_batch_size} = micro-batch {plan.micro_batch_size} x "
        f"accumulation {plan.num_microbatches} x data-parallel size {plan.dp}, the last\n"
        "from the model-parallel unit (mpu) passed to deepspeed.initialize: with Megatron-DeepSpeed,\n"
        f"--tensor-model-parallel-size {plan.tp} --pipeline-model-parallel-size {plan.pp} on "
        f"{cluster.num_devices} ranks gives data-parallel size {plan.dp}.\n")
    return [
        LaunchFile(ENGINE, Path("deepspeed_config.json"), json.dumps(config, indent=2) + "\n",
                   list(approx)),
        LaunchFile(ENGINE, Path("deepspeed_config.notes.txt"), notes),
    ]


def _zero_stage(plan: TrainingPlan, approx: Approximations) -> int:
    """One ZeRO stage for every rank; at most 1 with pipeline parallelism, which DeepSpeed's
    pipeline engine requires (runtime/pipe/engine.py asserts stage < 2)."""
    stages = plan.stage_zero()
    if plan.pp == 1 or max(stages) <= 1:
        return approx.one_value(stages, "ZeRO stages", "stage {value}")
    approx.add(
        f"DeepSpeed's pipeline engine runs only ZeRO stages 0 and 1: the plan's ZeRO stages per "
        f"pipeline stage {stages} written as stage 1, so gradients"
        + (" and weights" if max(stages) == 3 else "")
        + f" stay whole on each of the {plan.dp} data-parallel ranks instead of 1/{plan.dp} "
        "(more memory per rank than the plan)")
    return 1


def _zero(plan: TrainingPlan, zero: int, approx: Approximations) -> dict:
    z: dict = {"stage": zero, "overlap_comm": plan.overlap_grad_reduce,
               "contiguous_gradients": True, "reduce_bucket_size": REDUCE_BUCKET_BYTES}
    if zero == 0 and plan.overlap_grad_reduce and plan.dp > 1:
        approx.add("DeepSpeed without ZeRO all-reduces gradients after the backward pass: "
                   "overlap_grad_reduce takes effect only from ZeRO stage 1")
    offload = stage_offload(plan)
    opt = approx.one_value(offload["optimizer"], "optimizer offload fractions",
                           "optimizer fraction {value:g}")
    opt_written = 0.0  # fraction of the optimizer (and its gradients) the file offloads
    if opt > 0 and zero == 0:
        approx.add(f"DeepSpeed offloads the optimizer only under ZeRO (stage >= 1): optimizer "
                   f"offload fraction {opt:g} not written")
    elif opt > 0:
        z["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
        opt_written = 1.0
        if opt < 1 and zero == 3:
            z["offload_optimizer"]["ratio"] = opt
            opt_written = opt
        elif opt < 1:
            approx.add(f"DeepSpeed offloads part of the optimizer only under ZeRO-3 (ratio); at "
                       f"stage {zero} it is all or nothing: optimizer fraction {opt:g} written as "
                       "offload_optimizer device cpu")
    weights = approx.one_value(offload["weights"], "weight offload fractions",
                               "weights fraction {value:g}")
    if weights > 0 and zero < 3:
        approx.add(f"DeepSpeed offloads weights only under ZeRO-3 (offload_param): weights "
                   f"offload fraction {weights:g} not written at stage {zero}")
    elif weights > 0:
        z["offload_param"] = {"device": "cpu", "pin_memory": True}
        if weights < 1:
            approx.add(f"DeepSpeed offloads parameters all or nothing: weights fraction "
                       f"{weights:g} written as offload_param device cpu")
    grads = approx.one_value(offload["gradients"], "gradient offload fractions",
                             "gradients fraction {value:g}")
    if grads != opt_written and (grads > 0 or opt_written > 0):
        approx.add(f"DeepSpeed moves gradients to the host only with the optimizer step they "
                   f"feed: gradient offload fraction {grads:g} follows the optimizer's "
                   f"({opt_written:g})")
    return z


def _sharding(model: TransformerSpec, plan: TrainingPlan, z: dict, approx: Approximations) -> None:
    """ZeRO-3's HSDP shard size (as ZeRO++ hpZ) and the FSDP schedules DeepSpeed cannot write."""
    if plan.replicate_degree > 1:
        n, dp = plan.shard_degree, plan.dp
        z["zero_hpz_partition_size"] = n
        approx.add(
            f"DeepSpeed has no HSDP: dp_shard {n} written as ZeRO++ zero_hpz_partition_size {n}, which "
            f"adds a second copy of the 16-bit weights sharded over groups of {n} ranks and serves only "
            f"the backward all-gathers from it; the forward all-gathers and the gradient reduce-scatters "
            f"still span all {dp} ranks, weights, gradients and optimizer states stay sharded over all "
            f"{dp} (no all-reduce across {dp // n} replicas), and the copy costs 2 bytes per parameter "
            f"/ {n} more memory per rank than the plan"
        )
    if not plan.reshard_after_forward:
        approx.add("DeepSpeed ZeRO-3 frees gathered weights after each module's forward (only "
                   "stage3_max_reuse_distance / stage3_param_persistence_threshold keep some): "
                   "reshard_after_forward false cannot be written")
    if not plan.reshard_between_microbatches and plan.num_microbatches > 1:
        approx.add("DeepSpeed ZeRO-3 gathers weights and reduce-scatters gradients on every "
                   "micro-batch: reshard_between_microbatches false cannot be written")
    if not plan.regather_for_recompute and any(plan.stage_checkpointed(model)):
        approx.add("DeepSpeed ZeRO-3 gathers a checkpointed layer's weights again for its recompute "
                   "forward: regather_for_recompute false runs as true (one more all-gather per "
                   "checkpointed layer)")


def _activations(model: TransformerSpec, plan: TrainingPlan, approx: Approximations) -> dict:
    ckpt = plan.stage_checkpointed(model)
    recompute = plan.recompute != "none" or any(ckpt)
    act = approx.one_value(stage_offload(plan)["activations"], "activation offload fractions",
                           "activations fraction {value:g}")
    if plan.recompute in ("selective", "selective_op"):
        approx.add("DeepSpeed's config does not choose what to recompute: selective recompute "
                   "(the attention core) is left to the model code, e.g. Megatron-DeepSpeed")
    if any(ckpt):
        approx.add(f"DeepSpeed's config does not choose what to recompute: the training script must "
                   f"wrap {ckpt} layers per stage in deepspeed.checkpointing.checkpoint")
    if act > 0 and not recompute:
        approx.add("DeepSpeed offloads only checkpointed activations (cpu_checkpointing): with "
                   f"recompute none the activation offload fraction {act:g} has no effect")
    elif 0 < act < 1:
        approx.add(f"DeepSpeed offloads checkpointed activations all or nothing: activation "
                   f"fraction {act:g} written as cpu_checkpointing true")
    return {
        "partition_activations": bool(act > 0 or (recompute and plan.tp > 1)),
        "cpu_checkpointing": bool(act > 0),
        "contiguous_memory_optimization": False,
    }


def _parallel_notes(
    model: TransformerSpec, plan: TrainingPlan, zero: int, approx: Approximations
) -> None:
    if plan.tp > 1:
        sp = " with sequence parallelism" if plan.sequence_parallel else ""
        approx.add(f"DeepSpeed alone has no tensor parallelism: tp {plan.tp}{sp} needs "
                   "Megatron-DeepSpeed's model-parallel unit; the config cannot set it")
    if plan.pp == 1:
        return
    approx.add(f"DeepSpeed pipelines only a deepspeed.pipe.PipelineModule: pp {plan.pp} is set by "
               f"PipelineModule(num_stages={plan.pp}) in the training script, not by this config")
    if plan.schedule != "1f1b":
        approx.add(f"DeepSpeed's pipeline engine runs its own 1F1B schedule: "
                   f"schedule {plan.schedule} cannot be chosen")
    layers = plan.stage_layers(model)
    if len(set(layers)) > 1:
        approx.add(f"DeepSpeed's PipelineModule balances layers by its partition_method: "
                   f"stage layers {layers} need partition_method set in the training script")
