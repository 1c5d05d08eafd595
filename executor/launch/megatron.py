"""Megatron-LM: `megatron_args.sh`, the pretrain_gpt.py arguments for a plan, launched by torchrun.

Megatron expresses TP, PP (with interleaving), sequence parallelism, selective or full
recompute and the distributed optimizer (ZeRO-1) directly; ZeRO-3 without pipeline
parallelism as Megatron-FSDP (`--use-megatron-fsdp --data-parallel-sharding-strategy
optim_grads_params`, HSDP through `--num-distributed-optimizer-instances` = dp / dp_shard
replicas), and fp8 linears as Transformer Engine's `--fp8-format hybrid --fp8-recipe tensorwise`
(`--fp8-param-gather` for fp8 all-gathers). What it cannot express is recorded: ZeRO-2, ZeRO-3
with pipeline parallelism, FSDP's reshard_after_forward / reshard_between_microbatches off,
per-stage ZeRO or recompute counts (its block method checkpoints the same number of layers on
every stage), stage sizes other than a different first and/or last stage, and offloading of
anything but the optimizer.
"""

from __future__ import annotations

import math
from pathlib import Path

from executor.launch.base import Approximations, LaunchFile, header, stage_offload
from executor.launch.torchrun import SHELL_PROLOGUE, array, expand, torchrun_command
from simulator.specs.hardware import ClusterSpec
from simulator.specs.model import TransformerSpec
from simulator.specs.plan import TrainingPlan

ENGINE = "megatron"
Args = list[list[str]]  # one flag and its values per entry


def write(model: TransformerSpec, cluster: ClusterSpec, plan: TrainingPlan) -> list[LaunchFile]:
    approx = Approximations("Megatron-LM")
    gpt = _model_args(model, plan, approx)
    memory, needs_dist_opt = _memory_args(model, plan, approx)
    parallel = _parallel_args(model, plan, approx, needs_dist_opt)
    data = [["--mock-data"], ["--tokenizer-type", "NullTokenizer"],
            ["--vocab-size", str(model.vocab_size)], ["--train-iters", "100"],
            ["--lr", "1.0e-4"], ["--log-interval", "1"], ["--eval-iters", "0"]]
    arrays = {"GPT_ARGS": gpt, "PARALLEL_ARGS": parallel, "MEMORY_ARGS": memory, "DATA_ARGS": data}
    text = (
        "#!/usr/bin/env bash\n"
        + header("Megatron-LM (pretrain_gpt.py)", model, cluster, plan, approx)
        + "# Run on every node; MEGATRON_LM is the Megatron-LM checkout. DATA_ARGS are placeholders\n"
        + "# (mock data, 100 iterations): replace them with the real corpus and schedule.\n"
        + SHELL_PROLOGUE
        + ': "${MASTER_ADDR:=localhost}"\n: "${MASTER_PORT:=29500}"\n: "${MEGATRON_LM:=.}"\n'
        # Megatron-FSDP overlaps its collectives on more than one hardware queue
        + ("unset CUDA_DEVICE_MAX_CONNECTIONS\n\n" if _megatron_fsdp(plan)
           else "export CUDA_DEVICE_MAX_CONNECTIONS=1\n\n")
        + "".join(array(name, args) for name, args in arrays.items())
        + "ARGS=(" + " ".join(expand(name) for name in arrays) + ")\n\n"
        + torchrun_command(cluster, '"$MEGATRON_LM/pretrain_gpt.py" ' + expand("ARGS"))
    )
    return [LaunchFile(ENGINE, Path("megatron_args.sh"), text, list(approx), executable=True)]


def _model_args(model: TransformerSpec, plan: TrainingPlan, approx: Approximations) -> Args:
    seq = plan.seq(model)
    args = [["--num-layers", model.num_layers], ["--hidden-size", model.hidden_size],
            ["--num-attention-heads", model.num_attention_heads]]
    if model.num_kv_heads < model.num_attention_heads:
        args += [["--group-query-attention"], ["--num-query-groups", model.num_kv_heads]]
    args += [["--ffn-hidden-size", model.ffn_hidden_size], ["--seq-length", seq],
             ["--max-position-embeddings", max(seq, model.seq_length)],
             ["--micro-batch-size", plan.micro_batch_size],
             ["--global-batch-size", plan.global_batch_size]]
    if model.activation == "swiglu":
        args.append(["--swiglu"])
    elif model.activation == "relu":
        approx.add("Megatron-LM has no plain ReLU MLP flag: the model's ReLU runs as the default GeLU")
    if model.norm == "rmsnorm":
        args.append(["--normalization", "RMSNorm"])
    if not model.bias:
        args.append(["--disable-bias-linear"])
    if model.position_embedding == "rope":
        args.append(["--position-embedding-type", "rope"])
        if model.rope_theta is None:
            approx.add(f"{model.name}'s spec gives no rope_theta: Megatron-LM's default "
                       "--rotary-base 10000 applies")
        elif model.rope_theta != int(model.rope_theta):
            approx.add(f"Megatron-LM's --rotary-base is an integer: rope_theta {model.rope_theta:g} "
                       f"written as {int(model.rope_theta)}")
        if model.rope_theta is not None:
            args.append(["--rotary-base", int(model.rope_theta)])
        if model.rope_scaling_factor:
            args += [["--use-rope-scaling"], ["--rope-scaling-factor", f"{model.rope_scaling_factor:g}"]]
    elif model.position_embedding == "alibi":
        approx.add("Megatron-LM has no ALiBi: the model's positions run as learned absolute embeddings")
    if not model.tied_embeddings:
        args.append(["--untie-embeddings-and-output-weights"])
    if not model.dropout:
        args += [["--attention-dropout", "0.0"], ["--hidden-dropout", "0.0"]]
    args.append(["--bf16"])
    if plan.precision == "fp8":
        args += [["--fp8-format", "hybrid"], ["--fp8-recipe", "tensorwise"]]
        if plan.fp8_all_gather:
            args.append(["--fp8-param-gather"])
    # With --bf16 Megatron accumulates and all-reduces gradients in fp32 unless told otherwise
    if plan.gradient_dtype == "fp32":
        args.append(["--accumulate-allreduce-grads-in-fp32"])
    else:
        args.append(["--grad-reduce-in-bf16"])
        if plan.gradient_dtype == "fp16":
            approx.add("Megatron-LM reduces gradients in fp32 or bf16: fp16 gradients written as "
                       "bf16 (--grad-reduce-in-bf16)")
    if plan.flash_attention:
        args.append(["--use-flash-attn"])
    return [[str(x) for x in a] for a in args]


def _parallel_args(
    model: TransformerSpec, plan: TrainingPlan, approx: Approximations, needs_dist_opt: bool
) -> Args:
    args = [["--tensor-model-parallel-size", str(plan.tp)],
            ["--pipeline-model-parallel-size", str(plan.pp)]]
    args += _stage_split(model, plan, approx)
    if plan.schedule == "gpipe" and plan.pp > 1:
        approx.add("Megatron-LM has no GPipe schedule: the pipeline runs its 1F1B schedule")
    if plan.sequence_parallel:
        args.append(["--sequence-parallel"])
    zero = approx.one_value(plan.stage_zero(), "ZeRO stages", "ZeRO-{value}")
    if _megatron_fsdp(plan):
        args += _fsdp_args(plan, approx)
    elif zero == 3 and plan.dp > 1:
        approx.add(
            f"Megatron-LM has no ZeRO-3 with pipeline parallelism here (Megatron-FSDP is written only "
            f"for pp 1): pp {plan.pp} with ZeRO-3 wrote --use-distributed-optimizer, which shards only "
            f"optimizer states (ZeRO-1), so weights and gradients stay whole on each of the "
            f"{plan.dp} data-parallel ranks"
            + (f" (and dp_shard {plan.dp_shard} is not written)" if plan.replicate_degree > 1 else "")
        )
    elif zero == 2 and plan.dp > 1:
        approx.add(
            f"Megatron-LM has no ZeRO-{zero}: wrote --use-distributed-optimizer, which shards "
            "only optimizer states (ZeRO-1), so "
            + f"gradients stay whole on each of the {plan.dp} data-parallel ranks"
        )
    if zero >= 1 or needs_dist_opt:
        args.append(["--use-distributed-optimizer"])
    if plan.overlap_grad_reduce:
        args.append(["--overlap-grad-reduce"])
    if plan.overlap_tp_comm and plan.tp > 1:
        if plan.sequence_parallel:
            args.append(["--tp-comm-overlap"])
        else:
            approx.add("Megatron-LM overlaps TP communication only with sequence parallelism: "
                       "overlap_tp_comm not written (--tp-comm-overlap needs --sequence-parallel)")
    return args


def _megatron_fsdp(plan: TrainingPlan) -> bool:
    """ZeRO-3 on every stage, no pipeline: written as Megatron-FSDP."""
    return plan.pp == 1 and plan.dp > 1 and plan.stage_zero() == [3]


def _fsdp_args(plan: TrainingPlan, approx: Approximations) -> Args:
    """Megatron-FSDP (ZeRO-3), HSDP replicas, and the FSDP schedules it cannot write."""
    args = [["--use-megatron-fsdp"], ["--data-parallel-sharding-strategy", "optim_grads_params"],
            ["--ckpt-format", "fsdp_dtensor"], ["--no-gradient-accumulation-fusion"]]
    if plan.replicate_degree > 1:  # HSDP: shard within dp / replicas ranks, replicate across
        args += [["--num-distributed-optimizer-instances", str(plan.replicate_degree)],
                 ["--outer-dp-sharding-strategy", "no_shard"]]
    if not plan.reshard_after_forward:
        approx.add("Megatron-FSDP has no setting to keep gathered weights from forward to backward: "
                   "reshard_after_forward false not written (weights are gathered again in backward)")
    if not plan.reshard_between_microbatches and plan.num_microbatches > 1:
        approx.add("Megatron-FSDP gathers weights and reduce-scatters gradients on every micro-batch: "
                   "reshard_between_microbatches false cannot be written")
    return args


def _stage_split(model: TransformerSpec, plan: TrainingPlan, approx: Approximations) -> Args:
    """Layers per stage: uniform, interleaved chunks, or a different first and/or last stage."""
    layers = plan.stage_layers(model)
    if plan.pp == 1:
        return []
    if plan.schedule == "interleaved":
        v = plan.virtual_stages
        per_chunk = model.num_layers // (plan.pp * v)
        if len(set(layers)) > 1 or layers[0] % v:
            approx.add(f"Megatron-LM interleaves only equal chunks: stage layers {layers} over "
                       f"{v} virtual stages written as {per_chunk} layers per virtual stage")
        return [["--num-layers-per-virtual-pipeline-stage", str(per_chunk)]]
    if len(set(layers)) == 1:
        return []
    if plan.pp == 2:  # the last stage takes what the first leaves
        return [["--decoder-first-pipeline-num-layers", str(layers[0])]]
    middle = set(layers[1:-1])
    if len(middle) > 1:
        approx.add(f"Megatron-LM can only make the first and last stage differ: stage layers "
                   f"{layers} written as a uniform split of {model.num_layers} layers")
        return []
    m = middle.pop()
    return [[flag, str(n)] for flag, n in (("--decoder-first-pipeline-num-layers", layers[0]),
                                          ("--decoder-last-pipeline-num-layers", layers[-1]))
            if n != m]


def _memory_args(
    model: TransformerSpec, plan: TrainingPlan, approx: Approximations
) -> tuple[Args, bool]:
    """Recompute and offloading flags, and whether they need the distributed optimizer."""
    args: Args = []
    layers, ckpt = plan.stage_layers(model), plan.stage_checkpointed(model)
    if plan.recompute in ("selective", "selective_op"):
        args.append(["--recompute-granularity", "selective"])
        if plan.recompute == "selective_op":
            approx.add("Megatron-LM has no per-op checkpointing policy: selective_op written as "
                       "--recompute-granularity selective (re-runs the attention core, keeps every matmul output)")
        if any(ckpt):
            approx.add("Megatron-LM recomputes at one granularity: wrote selective, so the "
                       f"fully checkpointed layers per stage {ckpt} are not recomputed in full")
    elif any(ckpt):
        args.append(["--recompute-granularity", "full"])
        if ckpt == layers:
            args += [["--recompute-method", "uniform"], ["--recompute-num-layers", "1"]]
        else:
            n = approx.one_value(ckpt, "numbers of checkpointed layers",
                                 "--recompute-method block with {value} layers per stage")
            if plan.schedule == "interleaved":  # block counts apply per model chunk
                v = plan.virtual_stages
                if n % v:
                    approx.add(f"Megatron-LM's block recompute counts layers per virtual stage: "
                               f"{n} checkpointed layers per stage rounded up to "
                               f"{math.ceil(n / v)} per virtual stage")
                n = math.ceil(n / v)
            args += [["--recompute-method", "block"], ["--recompute-num-layers", str(n)]]
    offload = stage_offload(plan)
    opt = approx.one_value(offload["optimizer"], "optimizer offload fractions",
                           "--optimizer-offload-fraction {value:g}")
    if opt > 0:
        args += [["--optimizer-cpu-offload"], ["--optimizer-offload-fraction", f"{opt:g}"],
                 ["--use-precision-aware-optimizer"]]
        if max(plan.stage_zero()) == 0:
            approx.add("Megatron-LM offloads the optimizer only through its distributed optimizer: "
                       "added --use-distributed-optimizer (ZeRO-1) to a ZeRO-0 plan")
    for kind in ("weights", "gradients", "activations"):
        frac = max(offload[kind])
        if frac > 0:
            approx.add(f"Megatron-LM has no launch flag to offload {kind}: {kind} offload "
                       f"fraction {frac:g} not written ({kind} stay on the device)")
    return args, opt > 0

