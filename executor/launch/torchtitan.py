"""torchtitan 0.3: `torchtitan_job.py`, a registered Python job config, and `torchtitan.sh`.

Since 0.3 a torchtitan job is a Python function returning `Trainer.Config`, found by
`--module` (a module on PYTHONPATH) and `--config` (the function), plus command-line overrides
(`torchrun ... -m torchtitan.train --module torchtitan_job --config simtune_job ...`). The job
file sets everything the plan decides (model, parallelism, batching, checkpointing, compile);
the script's OVERRIDES hold what the plan does not (output folder, tokenizer, dataset, steps).
torchtitan 0.2.x read TOML instead: `torchtitan_toml` writes that (engine `torchtitan@0.2`).
Both share this module's plan-to-settings translation.

The model is matched by architecture, never by shape alone: a torchtitan llama3 flavor is
used only when layers, widths, heads, vocabulary, RoPE base and scaling and tied embeddings
all equal the model's. Otherwise 0.3 gets a custom model block built with torchtitan's own
llama3 layer builder, and a model that is not a llama (LayerNorm, GELU, biases, learned or
ALiBi positions) is refused by name (`EngineRefusal`).

torchtitan expresses TP (with or without sequence parallelism), PP with any stage split
(`module_fqns_per_model_part`), interleaving, micro-batching, full or per-op selective
recompute. Its data parallelism is DDP (replicate), FSDP2 (shard, ZeRO-3-like) or both (HSDP:
`data_parallel_shard_degree` = dp_shard, `data_parallel_replicate_degree` = its replicas), so
ZeRO-1/2 are approximated; fp8 linears are the float8 converter. It reduces gradients in
float32, cannot keep weights unsharded across gradient-accumulation micro-batches, offloads
weights, gradients and optimizer states together and whole, and (0.3) checkpoints either
every layer or none. Every such difference is recorded.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from executor.launch.base import Approximations, EngineRefusal, LaunchFile, header, stage_offload
from executor.launch.torchrun import SHELL_PROLOGUE, array, expand, torchrun_command
from simulator.specs.hardware import ClusterSpec
from simulator.specs.model import TransformerSpec
from simulator.specs.plan import TrainingPlan

ENGINE = "torchtitan"
VERSION = "0.3"
JOB_MODULE, JOB_FUNCTION = "torchtitan_job", "simtune_job"
SCHEDULES = {"gpipe": "GPipe", "1f1b": "1F1B", "interleaved": "Interleaved1F1B"}
ROPE_THETA_DEFAULT = 10000.0  # RoFormer's base (Su et al. 2021), what engines assume unset


@dataclass(frozen=True)
class Architecture:
    """What makes two llama-style decoders the same model, beyond their shape."""

    layers: int
    dim: int
    heads: int
    kv_heads: int
    ffn: int
    vocab: int
    rope_theta: float | None
    rope_scaling: float | None  # Llama-3.1 frequency scaling factor; None: none
    tied: bool

    @classmethod
    def of(cls, model: TransformerSpec) -> Architecture:
        return cls(model.num_layers, model.hidden_size, model.num_attention_heads,
                   model.num_kv_heads, model.ffn_hidden_size, model.vocab_size, model.rope_theta,
                   model.rope_scaling_factor, model.tied_embeddings)

    def differences(self, other: Architecture) -> list[str]:
        return [f"{name} {getattr(self, name)} vs {getattr(other, name)}"
                for name in self.__dataclass_fields__ if getattr(self, name) != getattr(other, name)]


def _llama3(layers, dim, heads, ffn, tied=False) -> Architecture:
    """torchtitan's llama3 flavors are Llama 3.1/3.2 shapes: vocab 128256, RoPE base 500000
    with the Llama-3.1 scaling of factor 8 (both releases' llama3 model code)."""
    return Architecture(layers, dim, heads, 8, ffn, 128256, 500000.0, 8.0, tied)


# torchtitan.models.llama3 flavors (0.3: `llama3_configs`; 0.2: `llama3_args`), their ffn
# widths as its compute_ffn_hidden_dim gives them
FLAVORS = {
    "0.3": {"1B": _llama3(16, 2048, 32, 8192, tied=True), "3B": _llama3(28, 3072, 24, 8192, tied=True),
            "8B": _llama3(32, 4096, 32, 14336), "70B": _llama3(80, 8192, 64, 28672),
            "405B": _llama3(126, 16384, 128, 53248)},
    "0.2": {"8B": _llama3(32, 4096, 32, 14336), "70B": _llama3(80, 8192, 64, 28672),
            "405B": _llama3(126, 16384, 128, 53248)},
}


def engine_name(version: str) -> str:
    return ENGINE if version == VERSION else f"{ENGINE}@{version}"


def not_llama(model: TransformerSpec) -> list[str]:
    """The model's features torchtitan's llama3 model has no setting for."""
    return [x for x, differs in (
        (f"{model.activation} MLP", model.activation != "swiglu"),
        ("LayerNorm", model.norm != "rmsnorm"), ("biases", model.bias),
        (f"{model.position_embedding} positions", model.position_embedding != "rope")) if differs]


def flavor_of(model: TransformerSpec, version: str) -> str | None:
    """The torchtitan llama3 flavor that is this model, or None; refuses a model no llama3
    model of that release can be."""
    unlike = not_llama(model)
    if unlike:
        raise EngineRefusal(engine_name(version), (
            f"torchtitan's llama3 model has no {', '.join(unlike)}: it cannot run {model.name}; "
            "Megatron-LM, DeepSpeed or simtune's own runner (torchrun, slurm) can"))
    arch = Architecture.of(model)
    match = next((name for name, flavor in FLAVORS[version].items() if flavor == arch), None)
    if match is None and version != VERSION:
        nearest = [f"'{n}' differs in {', '.join(arch.differences(f))}"
                   for n, f in FLAVORS[version].items() if (f.layers, f.dim) == (arch.layers, arch.dim)]
        raise EngineRefusal(engine_name(version), (
            f"torchtitan {version} has no llama3 flavor that is {model.name} and its TOML cannot "
            f"define one{' (' + '; '.join(nearest) + ')' if nearest else ''}: use engine "
            f"'{ENGINE}' (torchtitan {VERSION}), whose job file carries a custom model block"))
    return match


def check_model(model: TransformerSpec, version: str = VERSION) -> None:
    """Raise EngineRefusal now (before a search) if this torchtitan cannot run `model`."""
    flavor_of(model, version)


# --- the plan's settings, shared by both releases ------------------------------------------------


def parallelism(model: TransformerSpec, plan: TrainingPlan, approx: Approximations, version: str) -> dict:
    """[parallelism] settings; async TP is in it for 0.2 and in the compile settings for 0.3."""
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
        if version == VERSION:
            p["enable_sequence_parallel"] = plan.sequence_parallel
        elif not plan.sequence_parallel:
            approx.add("torchtitan 0.2's tensor parallelism always shards norms along the sequence: "
                       "sequence_parallel false runs as sequence parallel")
        if plan.overlap_tp_comm and version != VERSION:
            p["enable_async_tensor_parallel"] = True  # needs [compile] enable
    if not plan.flash_attention:
        approx.add("torchtitan always uses its fused attention kernels (SDPA or flex): "
                   "flash_attention false cannot be written")
    p["pipeline_parallel_degree"] = plan.pp
    if plan.pp > 1:
        p["pipeline_parallel_schedule"] = SCHEDULES[plan.schedule]
        p["pipeline_parallel_microbatch_size"] = plan.micro_batch_size
        p["module_fqns_per_model_part"] = _model_parts(model, plan, version)
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


def _model_parts(model: TransformerSpec, plan: TrainingPlan, version: str) -> list[list[str]]:
    """Modules of each (virtual) stage in model order; part k runs on rank k % pp."""
    v, layers = plan.virtual_stages, plan.stage_layers(model)
    sizes = [n // v + (c < n % v) for c in range(v) for n in layers]
    parts, start = [], 0
    for size in sizes:
        parts.append([f"layers.{i}" for i in range(start, start + size)])
        start += size
    parts[0].insert(0, "tok_embeddings")
    parts[-1] += ["norm", "lm_head" if version == VERSION else "output"]
    return parts


def training(model: TransformerSpec, plan: TrainingPlan, fsdp: bool, approx: Approximations) -> dict:
    """[training] settings: batching, sequence, precision, host offloading."""
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
            "seq_len": plan.seq(model), "mixed_precision_param": "bfloat16",
            "mixed_precision_reduce": "float32", "enable_cpu_offload": cpu_offload}


# --- the 0.3 job file and script ----------------------------------------------------------------


def write(model: TransformerSpec, cluster: ClusterSpec, plan: TrainingPlan) -> list[LaunchFile]:
    approx = Approximations(f"torchtitan {VERSION}")
    flavor = flavor_of(model, VERSION)
    par = parallelism(model, plan, approx, VERSION)
    fsdp = par["data_parallel_shard_degree"] > 1
    train = training(model, plan, fsdp, approx)
    train["steps"] = 100
    if plan.pp > 1:
        train["disable_cuda_graphs"] = True  # torchtitan 0.3's pipeline schedules need it
    async_tp = plan.tp > 1 and plan.overlap_tp_comm
    compile_ = {"enable": async_tp, "enable_async_tensor_parallel": async_tp,
                "components": ["model", "loss"]}
    converters = _float8(plan, async_tp, approx)
    checkpoint = _checkpointing(model, plan, approx)
    model_code = _model_code(model, plan, flavor, converters, approx)
    job = (header(f"torchtitan {VERSION} (the job torchtitan.sh runs)", model, cluster, plan, approx)
           + f'"""simtune job for torchtitan {VERSION}: `--module {JOB_MODULE} --config {JOB_FUNCTION}`."""\n\n'
           + _IMPORTS + model_code.imports + "\n\n"
           + model_code.definitions
           + f"def {JOB_FUNCTION}() -> Trainer.Config:\n"
           + f"    model_spec = {model_code.spec}\n"
           + "    return Trainer.Config(\n"
           + "        model_spec=model_spec,\n"
           + "        loss=ChunkedLossWrapper.Config(\n"
           + "            loss_fn=CrossEntropyLoss.Config(global_vocab_size=decoder_vocab_size(model_spec)),\n"
           + "        ),\n"
           + "        optimizer=default_adamw(lr=3e-4),  # placeholder: set the real schedule\n"
           + _call("training", "TrainingConfig", train)
           + "        dataloader=HuggingFaceTextDataLoader.Config(dataset=\"c4_test\"),\n"
           + _call("parallelism", "ParallelismConfig", par)
           + f"        activation_checkpoint={checkpoint},\n"
           + _call("compile", "CompileConfig", compile_)
           + "    )\n")
    compile(job, JOB_MODULE + ".py", "exec")  # what we write must at least be Python
    overrides = [["--dump_folder", "./outputs"], ["--hf_assets_path", "./assets/hf/tokenizer"],
                 ["--dataloader.dataset", "c4_test"], ["--training.steps", "100"]]
    program = (f"-m torchtitan.train --module {JOB_MODULE} --config {JOB_FUNCTION} "
               + expand("OVERRIDES"))
    script = (
        "#!/usr/bin/env bash\n"
        + header(f"torchtitan {VERSION} (torchrun -m torchtitan.train)", model, cluster, plan, approx)
        + f"# Runs the job in {JOB_MODULE}.py (beside this script) on every node; set MASTER_ADDR\n"
        + "# to the first node's address. OVERRIDES are placeholders: point them at the real\n"
        + "# tokenizer, dataset and step count.\n"
        + SHELL_PROLOGUE
        + ': "${MASTER_ADDR:=localhost}"\n: "${MASTER_PORT:=29500}"\n'
        + 'HERE=$(cd "$(dirname "$0")" && pwd)\n'
        + 'export PYTHONPATH="$HERE${PYTHONPATH:+:$PYTHONPATH}"\n\n'
        + array("OVERRIDES", overrides)
        + "\n" + torchrun_command(cluster, program)
    )
    return [LaunchFile(ENGINE, Path(JOB_MODULE + ".py"), job, list(approx)),
            LaunchFile(ENGINE, Path("torchtitan.sh"), script, list(approx), executable=True)]


_IMPORTS = """\
from torchtitan.components.loss import ChunkedLossWrapper, CrossEntropyLoss
from torchtitan.components.optimizer import default_adamw
from torchtitan.config import CompileConfig, ParallelismConfig, TrainingConfig
from torchtitan.distributed.activation_checkpoint import FullAC, SelectiveAC
from torchtitan.hf_datasets.text_datasets import HuggingFaceTextDataLoader
from torchtitan.models.common.config_utils import decoder_vocab_size
from torchtitan.trainer import Trainer
"""


@dataclass(frozen=True)
class _ModelCode:
    imports: str
    definitions: str
    spec: str  # the expression that gives the ModelSpec


def _model_code(model: TransformerSpec, plan: TrainingPlan, flavor: str | None,
                converters: str, approx: Approximations) -> _ModelCode:
    """A registered flavor when one is the model, else a custom llama3 model block."""
    imports = "from torchtitan.models.llama3 import model_registry\n"
    if converters:
        imports += "from torchtitan.components.quantization import Float8LinearConverter\n"
    conv = f", converters={converters}" if converters else ""
    if flavor is not None:
        return _ModelCode(imports, "", f'model_registry("{flavor}"{conv})')
    theta = model.rope_theta
    if theta is None:
        theta = ROPE_THETA_DEFAULT
        approx.add(f"{model.name}'s spec gives no rope_theta: the custom model block uses "
                   f"RoFormer's base {ROPE_THETA_DEFAULT:g}; set rope_theta in the model spec")
    if model.rope_scaling_factor:
        rope = (f'theta={theta!r}, scaling="llama", scaling_factor={model.rope_scaling_factor!r}')
    else:
        rope = f'theta={theta!r}, scaling="none"'
    imports = ("import torchtitan.models.llama3 as llama3\n"
               "from torchtitan.distributed.pipeline_parallel import pipeline_llm\n"
               "from torchtitan.models.common import ComplexRoPE, Embedding, Linear, RMSNorm\n"
               "from torchtitan.protocols.model_spec import ModelSpec\n"
               + ("from torchtitan.components.quantization import Float8LinearConverter\n"
                  "from torchtitan.models.utils import validate_converter_order\n" if converters else ""))
    h, v = model.hidden_size, model.vocab_size
    convert = (f"    converters = {converters}\n"
               "    validate_converter_order(converters)\n"
               "    for converter in converters:\n"
               "        config = converter.build().convert(config)\n") if converters else ""
    definitions = f'''\
def {model_function(model)}() -> ModelSpec:
    """{model.name}: no torchtitan llama3 flavor is this model, so its exact architecture is
    built here with torchtitan {VERSION}'s own llama3 builders (its flavors are written the same way)."""
    config = llama3.Llama3Model.Config(
        dim={h},
        vocab_size={v},
        enable_weight_tying={model.tied_embeddings},
        tok_embeddings=Embedding.Config(num_embeddings={v}, embedding_dim={h},
                                        param_init=llama3._EMBEDDING_INIT),
        norm=RMSNorm.Config(normalized_shape={h}, param_init=llama3._NORM_INIT),
        lm_head=Linear.Config(in_features={h}, out_features={v},
                              param_init=llama3._output_linear_init({h})),
        layers=llama3._build_llama3_layers(
            n_layers={model.num_layers},
            dim={h},
            n_heads={model.num_attention_heads},
            n_kv_heads={model.num_kv_heads},
            hidden_dim={model.ffn_hidden_size},
            rope=ComplexRoPE.Config(dim={model.head_dim}, max_seq_len={max(plan.seq(model), model.seq_length)},
                                    {rope}),
            fuse_qkv=True,
            attn_backend="flex",
        ),
    )
{convert}    return ModelSpec(
        name="llama3",
        flavor={model.name!r},
        model=config,
        parallelize_fn=llama3.parallelize_llama,
        pipelining_fn=pipeline_llm,
        post_optimizer_build_fn=None,
        state_dict_adapter=llama3.Llama3StateDictAdapter,
    )


'''
    return _ModelCode(imports, definitions, f"{model_function(model)}()")


def model_function(model: TransformerSpec) -> str:
    return "model_" + "".join(c if c.isalnum() else "_" for c in model.name)


def _float8(plan: TrainingPlan, compiled: bool, approx: Approximations) -> str:
    """The converters list expression for fp8 linears (rowwise scaling, 0.3's only float8
    recipes), or ''."""
    if plan.precision != "fp8":
        return ""
    if plan.fp8_all_gather:
        approx.add("torchtitan 0.3's float8 converter has no fp8 all-gather setting (0.2's "
                   "enable_fsdp_float8_all_gather): fp8_all_gather not written, weights are gathered in bf16")
    return f"[Float8LinearConverter.Config(model_compile_enabled={compiled})]"


def selective(model: TransformerSpec, plan: TrainingPlan, approx: Approximations) -> bool:
    """Whether the plan recomputes selectively; torchtitan (either release) then checkpoints
    no layer in full, which is noted when the plan also asks for that."""
    if plan.recompute not in ("selective", "selective_op"):
        return False
    ckpt = plan.stage_checkpointed(model)
    if any(ckpt):
        approx.add("torchtitan applies one checkpointing mode: wrote per-op selective, so the "
                   f"fully checkpointed layers per stage {ckpt} are not recomputed in full")
    return True


def _checkpointing(model: TransformerSpec, plan: TrainingPlan, approx: Approximations) -> str:
    """The activation_checkpoint expression: None, FullAC or SelectiveAC (per-op)."""
    layers, ckpt = plan.stage_layers(model), plan.stage_checkpointed(model)
    if selective(model, plan, approx):
        if plan.recompute == "selective":
            approx.add("torchtitan's selective checkpointing is per-op (it saves matmul and "
                       "attention outputs by an op policy): recompute selective (the attention "
                       "core only) written as SelectiveAC")
        return "SelectiveAC.Config()"
    if not any(ckpt):
        return "None"
    if ckpt != layers:
        approx.add(f"torchtitan {VERSION} checkpoints every layer or none (no every-Nth-layer "
                   f"option): checkpointed layers per stage {ckpt} of {layers} written as full "
                   "recompute of every layer")
    return "FullAC.Config()"


def _call(name: str, cls: str, values: dict) -> str:
    """`        name=Cls(\\n            key=value,\\n        ),` with Python reprs."""
    body = "".join(f"            {k}={_py(v)},\n" for k, v in values.items())
    return f"        {name}={cls}(\n{body}        ),\n"


def _py(value) -> str:
    if isinstance(value, list) and value and isinstance(value[0], list):
        inner = "".join(f"                {v!r},\n" for v in value)
        return "[\n" + inner + "            ]"
    return repr(value)
