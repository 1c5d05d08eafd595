"""torchtitan: `torchtitan.toml` in its job-config layout ([job], [model], [training], ...).

torchtitan expresses TP, PP with any stage split (listed module by module in
`module_fqns_per_model_part`), interleaving, micro-batching and full or per-op selective
recompute. Its data parallelism is DDP (replicate), FSDP2 (shard, ZeRO-3-like) or both (HSDP:
`data_parallel_shard_degree` = dp_shard, `data_parallel_replicate_degree` = its replicas), so
ZeRO-1/2 are approximated; `fsdp_reshard_after_forward` says "always" or "never"; fp8 linears
are the `float8` model converter, with `[float8] enable_fsdp_float8_all_gather`. It cannot keep
weights unsharded across gradient-accumulation micro-batches. Its CPU offload moves weights,
gradients and optimizer states together and whole; its TP always shards norms along the
sequence; gradients are reduced in float32.
The TOML is written by hand (no new dependency) and checked with tomllib.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

from executor.launch.base import Approximations, LaunchFile, header, stage_offload
from simulator.specs.hardware import ClusterSpec
from simulator.specs.model import TransformerSpec
from simulator.specs.plan import TrainingPlan

ENGINE = "torchtitan"
SCHEDULES = {"gpipe": "GPipe", "1f1b": "1F1B", "interleaved": "Interleaved1F1B"}
# torchtitan's llama3 flavors by (layers, hidden, heads, kv heads, ffn)
FLAVORS = {(32, 4096, 32, 8, 14336): "8B", (80, 8192, 64, 8, 28672): "70B",
           (126, 16384, 128, 8, 53248): "405B"}


def write(model: TransformerSpec, cluster: ClusterSpec, plan: TrainingPlan) -> list[LaunchFile]:
    approx = Approximations("torchtitan")
    parallelism = _parallelism(model, plan, approx)
    fsdp = parallelism["data_parallel_shard_degree"] > 1
    config = {
        "job": {"dump_folder": "./outputs",
                "description": f"simtune: {model.name} on {cluster.name}, plan {plan.name or ''}"},
        "model": _model(model, approx),
        "optimizer": {"name": "AdamW", "lr": 3e-4},
        "training": _training(model, plan, fsdp, approx),
        "parallelism": parallelism,
        "activation_checkpoint": _checkpointing(model, plan, approx),
        "compile": {"enable": parallelism.get("enable_async_tensor_parallel", False),
                    "components": ["model", "loss"]},
    }
    if plan.precision == "fp8":
        config["model"]["converters"] = ["float8"]
        # tensorwise scaling (the converter's default recipe) is what fp8 all-gather supports
        config["float8"] = {"enable_fsdp_float8_all_gather": plan.fp8_all_gather and fsdp,
                            "precompute_float8_dynamic_scale_for_fsdp": plan.fp8_all_gather and fsdp}
        if plan.fp8_all_gather and not fsdp:
            approx.add("torchtitan all-gathers fp8 weights only under FSDP: fp8_all_gather has no "
                       "effect without data_parallel_shard_degree > 1")
    text = (header("torchtitan (torchtitan.train --job.config_file)", model, cluster, plan, approx)
            + "# [optimizer], steps and dataset are placeholders: set them for the real run.\n\n"
            + to_toml(config))
    tomllib.loads(text)  # what we write must parse
    return [LaunchFile(ENGINE, Path("torchtitan.toml"), text, list(approx))]


def _model(model: TransformerSpec, approx: Approximations) -> dict:
    unlike = [x for x, differs in (
        (f"{model.activation} MLP", model.activation != "swiglu"),
        ("LayerNorm", model.norm != "rmsnorm"), ("biases", model.bias),
        (f"{model.position_embedding} positions", model.position_embedding != "rope"),
        ("tied embeddings", model.tied_embeddings)) if differs]
    shape = (model.num_layers, model.hidden_size, model.num_attention_heads,
             model.num_kv_heads, model.ffn_hidden_size)
    flavor = FLAVORS.get(shape, model.name)
    if unlike:
        approx.add(f"torchtitan's llama3 model has no {', '.join(unlike)}: {model.name} written as "
                   f"llama3 flavor '{flavor}', which must be registered with its shape")
    elif shape not in FLAVORS:
        approx.add(f"torchtitan has no llama3 flavor of {model.name}'s shape: flavor '{flavor}' "
                   "must be registered in its llama3 model args")
    return {"name": "llama3", "flavor": flavor}


def _training(model: TransformerSpec, plan: TrainingPlan, fsdp: bool, approx: Approximations) -> dict:
    # With PP, a rank's batch is split into pipeline micro-batches; without, torchtitan
    # accumulates local batches up to the global one.
    local = plan.global_batch_size // plan.dp if plan.pp > 1 else plan.micro_batch_size
    if plan.gradient_dtype != "fp32":
        approx.add(f"torchtitan reduces gradients in float32 (mixed_precision_reduce): "
                   f"{plan.gradient_dtype} gradients written as float32")
    offload = {k: max(v) for k, v in stage_offload(plan).items()}
    states = {k: offload[k] for k in ("weights", "gradients", "optimizer")}
    cpu_offload = any(states.values())
    if cpu_offload and not fsdp:
        approx.add("torchtitan offloads to the host only through FSDP: the plan's offloading is "
                   "written as enable_cpu_offload but has no effect without data_parallel_shard_degree > 1")
    elif cpu_offload and set(states.values()) != {1.0}:
        given = ", ".join(f"{k} {v:g}" for k, v in states.items())
        approx.add(f"torchtitan offloads weights, gradients and optimizer states together and whole "
                   f"(enable_cpu_offload): fractions {given} written as all on the host")
    if offload["activations"] > 0:
        approx.add(f"torchtitan has no activation offloading setting: activation offload fraction "
                   f"{offload['activations']:g} not written")
    return {"local_batch_size": local, "global_batch_size": plan.global_batch_size,
            "seq_len": plan.seq(model), "steps": 100, "dataset": "c4_test",
            "mixed_precision_param": "bfloat16", "mixed_precision_reduce": "float32",
            "enable_cpu_offload": cpu_offload}


def _parallelism(model: TransformerSpec, plan: TrainingPlan, approx: Approximations) -> dict:
    zero = approx.one_value(plan.stage_zero(), "ZeRO stages", "ZeRO-{value}")
    shard = (plan.shard_degree if zero == 3 else plan.dp) if plan.dp > 1 and zero >= 1 else 1
    p: dict = {"data_parallel_replicate_degree": plan.dp // shard,
               "data_parallel_shard_degree": shard}
    if shard > 1 and zero == 3:
        p["fsdp_reshard_after_forward"] = "always" if plan.reshard_after_forward else "never"
        _fsdp_notes(model, plan, approx)
    if shard > 1 and zero < 3:
        p["fsdp_reshard_after_forward"] = "never"
        approx.add(f"torchtitan has no ZeRO-{zero}; its FSDP2 is ZeRO-3-like: wrote "
                   f"data_parallel_shard_degree {plan.dp} with fsdp_reshard_after_forward "
                   "\"never\" (weights gathered from forward to backward), which also shards "
                   + ("gradients and " if zero == 1 else "") + "weights between steps")
    if plan.dp > 1 and not plan.overlap_grad_reduce:
        approx.add("torchtitan always overlaps gradient reduction with the backward pass: "
                   "overlap_grad_reduce false cannot be written")
    p["tensor_parallel_degree"] = plan.tp
    if plan.tp > 1:
        if not plan.sequence_parallel:
            approx.add("torchtitan's tensor parallelism always shards norms along the sequence: "
                       "sequence_parallel false runs as sequence parallel")
        if plan.overlap_tp_comm:
            p["enable_async_tensor_parallel"] = True  # needs [compile] enable, set below
    if not plan.flash_attention:
        approx.add("torchtitan always uses scaled_dot_product_attention (flash kernels where "
                   "available): flash_attention false cannot be written")
    p["pipeline_parallel_degree"] = plan.pp
    if plan.pp > 1:
        p["pipeline_parallel_schedule"] = SCHEDULES[plan.schedule]
        p["pipeline_parallel_microbatch_size"] = plan.micro_batch_size
        p["module_fqns_per_model_part"] = _model_parts(model, plan)
    p["context_parallel_degree"] = 1
    return p


def _fsdp_notes(model: TransformerSpec, plan: TrainingPlan, approx: Approximations) -> None:
    """What torchtitan's FSDP2 settings cannot say about a ZeRO-3 plan."""
    if not plan.reshard_between_microbatches and plan.num_microbatches > 1:
        approx.add("torchtitan gathers weights and reduce-scatters gradients on every micro-batch "
                   "of gradient accumulation: reshard_between_microbatches false (gather once, "
                   "accumulate unsharded gradients) cannot be written")
    if plan.regather_for_recompute and any(plan.stage_checkpointed(model)):
        approx.add("torchtitan's FSDP2 runs the recompute forward on the backward's gather: "
                   "regather_for_recompute true cannot be written")


def _model_parts(model: TransformerSpec, plan: TrainingPlan) -> list[list[str]]:
    """Modules of each (virtual) stage in model order; part k runs on rank k % pp."""
    v, layers = plan.virtual_stages, plan.stage_layers(model)
    sizes = [n // v + (c < n % v) for c in range(v) for n in layers]
    parts, start = [], 0
    for size in sizes:
        parts.append([f"layers.{i}" for i in range(start, start + size)])
        start += size
    parts[0].insert(0, "tok_embeddings")
    parts[-1] += ["norm", "output"]
    return parts


def _checkpointing(model: TransformerSpec, plan: TrainingPlan, approx: Approximations) -> dict:
    layers, ckpt = plan.stage_layers(model), plan.stage_checkpointed(model)
    if plan.recompute in ("selective", "selective_op"):
        if any(ckpt):
            approx.add("torchtitan applies one checkpointing mode: wrote per-op selective, so the "
                       f"fully checkpointed layers per stage {ckpt} are not recomputed in full")
        return {"mode": "selective", "selective_ac_option": "op"}
    if not any(ckpt):
        return {"mode": "none"}
    if ckpt == layers:
        return {"mode": "full"}
    # torchtitan's "int" option checkpoints every k-th layer: pick k so that every stage
    # checkpoints at least its share.
    every = min(n // c for n, c in zip(layers, ckpt) if c)
    written = {"mode": "full"}
    if every > 1:
        written = {"mode": "selective", "selective_ac_option": str(every)}
    if not all(c and n == c * every for n, c in zip(layers, ckpt)):
        what = "full recompute" if every <= 1 else f"one layer in {every} (selective_ac_option {every})"
        approx.add(f"torchtitan checkpoints the same share of layers model-wide: checkpointed layers "
                   f"per stage {ckpt} of {layers} written as {what}")
    return written


def to_toml(config: dict[str, dict]) -> str:
    """A two-level TOML document: tables of scalars, lists, and lists of lists of strings."""
    out = []
    for table, values in config.items():
        out.append(f"[{table}]")
        out += [f"{key} = {_toml_value(value)}" for key, value in values.items()]
        out.append("")
    return "\n".join(out)


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # JSON string escapes are valid TOML basic strings
    if value and isinstance(value[0], list):
        return "[\n" + "".join(f"    {_toml_value(v)},\n" for v in value) + "]"
    return "[" + ", ".join(_toml_value(v) for v in value) + "]"
