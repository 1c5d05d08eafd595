"""torchtitan 0.2.x (engine `torchtitan@0.2`): `torchtitan.toml`, its job-config layout.

0.2 is the last torchtitan release that reads TOML (`torchtitan.train --job.config_file`);
0.3 reads Python job configs (`torchtitan`). The plan's settings are the same translation
(`torchtitan.parallelism`, `torchtitan.training`); what differs here is the layout, the
checkpointing options (0.2 can checkpoint every k-th layer), fp8 as the
`quantize.linear.float8` converter with fp8 all-gather under FSDP, and the model: a TOML can
only name a registered flavor, so a model that no 0.2 flavor is (same shape, vocabulary, RoPE
base and scaling) is refused with `EngineRefusal` rather than written as another model.
The TOML is written by hand (no new dependency) and checked with tomllib.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

from executor.launch.base import Approximations, LaunchFile, header
from executor.launch.torchtitan import flavor_of, parallelism, selective, training
from simulator.specs.hardware import ClusterSpec
from simulator.specs.model import TransformerSpec
from simulator.specs.plan import TrainingPlan

ENGINE = "torchtitan@0.2"
VERSION = "0.2"


def check_model(model: TransformerSpec) -> None:
    flavor_of(model, VERSION)


def write(model: TransformerSpec, cluster: ClusterSpec, plan: TrainingPlan) -> list[LaunchFile]:
    approx = Approximations(f"torchtitan {VERSION}")
    flavor = flavor_of(model, VERSION)
    par = parallelism(model, plan, approx, VERSION)
    fsdp = par["data_parallel_shard_degree"] > 1
    config: dict[str, dict] = {
        "job": {"dump_folder": "./outputs",
                "description": f"simtune: {model.name} on {cluster.name}, plan {plan.name or ''}"},
        "model": {"name": "llama3", "flavor": flavor},
        "optimizer": {"name": "AdamW", "lr": 3e-4},
        "training": {**training(model, plan, fsdp, approx), "steps": 100, "dataset": "c4_test"},
        "parallelism": par,
        "activation_checkpoint": _checkpointing(model, plan, approx),
        "compile": {"enable": par.get("enable_async_tensor_parallel", False),
                    "components": ["model", "loss"]},
    }
    if plan.precision == "fp8":
        config["model"]["converters"] = ["quantize.linear.float8"]
        # tensorwise scaling (the converter's default recipe) is what fp8 all-gather supports
        config["quantize.linear.float8"] = {
            "enable_fsdp_float8_all_gather": plan.fp8_all_gather and fsdp,
            "precompute_float8_dynamic_scale_for_fsdp": plan.fp8_all_gather and fsdp}
        if plan.fp8_all_gather and not fsdp:
            approx.add("torchtitan all-gathers fp8 weights only under FSDP: fp8_all_gather has no "
                       "effect without data_parallel_shard_degree > 1")
    text = (header(f"torchtitan {VERSION}.x (torchtitan.train --job.config_file)", model, cluster,
                   plan, approx)
            + f"# For torchtitan {VERSION}.x only: 0.3 and later read Python job configs (engine "
            "'torchtitan').\n"
            + "# [optimizer], steps and dataset are placeholders: set them for the real run.\n\n"
            + to_toml(config))
    tomllib.loads(text)  # what we write must parse
    return [LaunchFile(ENGINE, Path("torchtitan.toml"), text, list(approx))]


def _checkpointing(model: TransformerSpec, plan: TrainingPlan, approx: Approximations) -> dict:
    layers, ckpt = plan.stage_layers(model), plan.stage_checkpointed(model)
    if selective(model, plan, approx):
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
    """TOML tables (dotted names allowed) of scalars, lists, and lists of lists of strings."""
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
