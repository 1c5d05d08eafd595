"""`make check-launch`: every launch file simtune writes, parsed by the engine's own parser.

Not part of `make test` (the file name is not test_*.py, and it needs the engines, about 4 GB):
`make check-launch` builds their environments once (tests/engines/setup.sh, into
.launch-envs/) and runs this file. For a matrix of training plans (the tuner's picks for three
published cases and hand-written plans covering dense and GQA models, TP with and without
sequence parallelism, PP with 1F1B and interleaving, uneven stages, ZeRO 1-3 and per-stage
ZeRO, HSDP, offloading, full/partial/selective recompute, fp8) and of serving deployments
(TP, PP, DP, draft-model and n-gram speculation), each engine's files are written, then:

- parsed with the engine's own parser, unknown keys or flags rejected (probes/*.py, run in the
  engines' environments): torchtitan 0.3's ConfigManager on the job module and the command's
  overrides, torchtitan 0.2.2's on the TOML, DeepSpeedConfig with a model-parallel unit,
  Megatron-LM's parse_args + validate_args, torchrun's own argument parser and simtune's
  executor (its dry run) on what the torchrun and Slurm scripts run, vLLM's `serve` parser;
- the parsed degrees, batch sizes, precision, checkpointing and model architecture are
  compared with the plan;
- an engine that refuses must do so for a reason checked here independently (a model that is
  not a llama on torchtitan, no 0.2 flavor with that architecture as torchtitan 0.2 itself
  lists them, a plan simtune's executor cannot run exactly).

Shell scripts run for real under bash with stub launchers that record their arguments, so
what is parsed is what bash passes. The results table goes to tests/engines/REPORT.md.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for launch_stubs

import launch_stubs  # noqa: E402
from launch_stubs import LOG  # noqa: E402

from executor.launch import EngineRefusal, render, write_files  # noqa: E402
from executor.launch.serving import emit_serving_configs  # noqa: E402
from executor.launch.torchtitan import Architecture, not_llama  # noqa: E402
from simulator.specs import (  # noqa: E402
    DeploymentSpec,
    TrainingPlan,
    load_cluster,
    load_deployment,
    load_model,
    load_plan,
)

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
ENVS = Path(os.environ.get("SIMTUNE_LAUNCH_ENVS", ROOT / ".launch-envs"))
TRAIN_PY, VLLM_PY = ENVS / "train/bin/python", ENVS / "vllm/bin/python"
GPU_ARCH = {"A100": 8, "H100": 9, "H200": 9, "L4": 8, "A10G": 8, "V100": 7}
REPORT = HERE / "REPORT.md"
RESULTS: list[tuple[str, str, str, str]] = []  # case, engine, outcome, detail

if not TRAIN_PY.exists() or not VLLM_PY.exists():
    pytest.exit(f"the engines' environments are missing under {ENVS}: run `make check-launch`", 2)


def plan(**fields) -> TrainingPlan:
    return TrainingPlan.parse(fields)


def tuned(model: str, cluster: str, batch: int) -> TrainingPlan:
    from tuner.training import tune_training

    return tune_training(load_model(model), load_cluster(cluster), batch, baselines=()).best.plan


TRAINING = {
    # the three published cases, with the tuner's own pick
    "gpt3-13b 2x8xa100-40gb (tuned)": ("gpt3-13b", "2x8xa100-40gb", lambda: tuned("gpt3-13b", "2x8xa100-40gb", 512)),
    "llama-3-8b 8xh100 (tuned)": ("llama-3-8b", "8xh100", lambda: tuned("llama-3-8b", "8xh100", 256)),
    "llama-2-70b 4x8xa100-80gb (tuned)": ("llama-2-70b", "4x8xa100-80gb",
                                          lambda: tuned("llama-2-70b", "4x8xa100-80gb", 128)),
    "gpt3-175b megatron plan": ("gpt3-175b", "16x8xa100-80gb", lambda: load_plan("megatron-gpt3-175b")),
    "llama-3.1-8b tp2 pp2 sp selective": ("llama-3.1-8b", "8xh100", lambda: plan(
        name="tp2-pp2", tp=2, pp=2, dp=2, micro_batch_size=1, global_batch_size=64,
        sequence_parallel=True, recompute="selective", zero_stage=1)),
    "llama-3.1-70b tp4 pp4 interleaved": ("llama-3.1-70b", "4x8xh100", lambda: plan(
        name="interleaved", tp=4, pp=4, dp=2, micro_batch_size=1, global_batch_size=64,
        schedule="interleaved", virtual_stages=2, sequence_parallel=True, recompute="full",
        zero_stage=1)),
    "llama-3.1-8b tp2 no sp, uneven stages": ("llama-3.1-8b", "8xh100", lambda: plan(
        name="uneven", tp=2, pp=2, dp=2, micro_batch_size=2, global_batch_size=64,
        sequence_parallel=False, stages=[{"layers": 15, "checkpointed_layers": 15},
                                         {"layers": 17, "checkpointed_layers": 8}])),
    "llama-2-7b fsdp full offload": ("llama-2-7b", "8xa100-80gb", lambda: plan(
        name="fsdp-offload", dp=8, micro_batch_size=1, global_batch_size=32, zero_stage=3,
        recompute="full", offload={"weights": 1.0, "gradients": 1.0, "optimizer": 1.0})),
    "llama-3.1-8b hsdp": ("llama-3.1-8b", "2x8xh100", lambda: plan(
        name="hsdp", dp=16, dp_shard=8, micro_batch_size=1, global_batch_size=64, zero_stage=3)),
    "llama-3.1-8b pp2, zero 2 then 1": ("llama-3.1-8b", "8xh100", lambda: plan(
        name="stage-zero", pp=2, dp=4, micro_batch_size=1, global_batch_size=64, zero_stage=1,
        stages=[{"layers": 16, "zero_stage": 2}, {"layers": 16, "zero_stage": 1}])),
    "gpt3-1.3b zero2": ("gpt3-1.3b", "8xa100-80gb", lambda: plan(
        name="zero2", dp=8, micro_batch_size=4, global_batch_size=128, zero_stage=2)),
    "llama-3.1-8b fp8 tp4": ("llama-3.1-8b", "8xh100", lambda: plan(
        name="fp8", tp=4, dp=2, micro_batch_size=1, global_batch_size=32, precision="fp8",
        sequence_parallel=True, zero_stage=1)),
}
ENGINES = ("megatron", "torchtitan", "torchtitan@0.2", "deepspeed", "torchrun", "slurm")

SERVING = {
    "llama-3-70b vllm-tp4 + draft speculation": ("llama-3-70b", "4xa100-80gb", "vllm-tp4-spec-llama3"),
    "llama-2-70b dp2 x tp4": ("llama-2-70b", "8xa100-80gb", {"prefill": {"tp": 4}, "dp": 2}),
    "llama-2-13b pp4 tp4 (seesaw, prefill layout)": ("llama-2-13b", "4xl4", "seesaw-pp4-tp4"),
    "llama-2-7b tp1 n-gram speculation": ("llama-2-7b", "1xa100-80gb", {
        "speculation": {"draft": "ngram", "policy": "fixed", "k": 3, "acceptance": {"mean": 0.6}}}),
    "llama-3-8b tp1 prefix caching": ("llama-3-8b", "1xa100-80gb", {"prefix_caching": True}),
}


# --- running the probes -------------------------------------------------------------------------


def probe(python: Path, script: str, *args: str, pythonpath: tuple[Path, ...] = (),
          cwd: Path | None = None, extra_env: dict[str, str] | None = None) -> dict:
    """Run probes/`script` under `python`; its last stdout line is JSON."""
    env = {**{k: v for k, v in os.environ.items() if k != "CUDA_DEVICE_MAX_CONNECTIONS"},
           **(extra_env or {}), "TORCH_EXTENSIONS_DIR": str(ENVS / "torch-extensions"),
           "PYTHONPATH": os.pathsep.join(str(p) for p in pythonpath), "DS_BUILD_OPS": "0",
           "VLLM_TARGET_DEVICE": "cpu", "HF_HUB_OFFLINE": "1", "GLOO_SOCKET_IFNAME": "lo"}
    done = subprocess.run([str(python), str(HERE / "probes" / script), *args], capture_output=True,
                          text=True, env=env, cwd=cwd, timeout=600)
    if done.returncode:
        raise AssertionError(f"{script} rejected it:\n{(done.stdout + done.stderr)[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


@functools.cache
def flavors(version: str) -> dict[str, Architecture]:
    """The engine's own llama3 flavors, as that torchtitan release defines them."""
    if version == "0.3":
        raw = probe(TRAIN_PY, "torchtitan03.py", "--flavors")
    else:
        raw = probe(TRAIN_PY, "torchtitan02.py", "--flavors", pythonpath=(ENVS / "titan02",))
    return {name: Architecture(a["layers"], a["dim"], a["heads"], a["kv_heads"], a["ffn"], a["vocab"],
                               float(a["rope_theta"]), a["rope_scaling_factor"], a["tied"])
            for name, a in raw.items()}


def stub_call(script: Path, tmp: Path, launcher: str) -> list[str]:
    """Run a generated script with stub launchers; the arguments `launcher` was given (and, in
    tmp/launch_env.json, the CUDA settings the script exported for it)."""
    record = (f'printf "%s\\n" "$@" > "{tmp}/calls.txt"; printf \'{{"CUDA_DEVICE_MAX_CONNECTIONS": "%s"}}\' '
              f'"${{CUDA_DEVICE_MAX_CONNECTIONS-}}" > "{tmp}/launch_env.json"')
    stubs = {"torchrun": 'exec "$@"', "srun": 'exec "$@"', "scontrol": "printf 'node-a\\nnode-b\\n'",
             launcher: record}
    return launch_stubs.run_with_stubs(script, tmp, stubs, unset=("MASTER_ADDR", "MASTER_PORT"),
                                       env={"SLURM_JOB_NODELIST": "node-[a-b]"})


def launch_env(tmp: Path) -> dict[str, str]:
    return {k: v for k, v in json.loads((tmp / "launch_env.json").read_text()).items() if v}


def torchrun_program(args: list[str], cluster) -> list[str]:
    """Parse a torchrun command line with torchrun's own parser; return the program's argv."""
    from torch.distributed.run import get_args_parser

    parsed = get_args_parser().parse_args(args)
    assert (int(parsed.nnodes), int(parsed.nproc_per_node)) == (cluster.num_nodes, cluster.devices_per_node)
    assert parsed.rdzv_backend == "c10d"
    return (["-m"] if parsed.module else []) + [parsed.training_script, *parsed.training_script_args]


# --- what each engine's parse must say ----------------------------------------------------------


def expected_refusal(engine: str, model, p: TrainingPlan) -> str | None:
    """Why `engine` must refuse, checked independently of the writers; None if it must not."""
    if engine.startswith("torchtitan") and not_llama(model):
        return "not a llama"
    if engine == "torchtitan@0.2" and Architecture.of(model) not in flavors("0.2").values():
        return "no torchtitan 0.2 flavor is this model"
    if engine in ("torchrun", "slurm"):
        fractional = any(getattr(o, k) not in (0.0, 1.0) for o in p.stage_offload()
                         for k in ("weights", "gradients", "optimizer", "activations"))
        if fractional or p.precision != "bf16":
            return "simtune's executor cannot run it exactly"
    return None


def check_megatron(model, cluster, p: TrainingPlan, out: Path, tmp: Path) -> str:
    call = stub_call(out / "megatron_args.sh", tmp, "torchrun")
    argv = torchrun_program(call, cluster)
    assert argv[0].endswith("pretrain_gpt.py")
    arch = GPU_ARCH[cluster.device.name.split("-")[0].split(" ")[0]]
    a = probe(TRAIN_PY, "megatron_probe.py", str(cluster.num_devices), str(arch), *argv[1:],
              pythonpath=(ENVS / "mcore",), extra_env=launch_env(tmp))
    assert (a["tensor_model_parallel_size"], a["pipeline_model_parallel_size"], a["data_parallel_size"]) \
        == (p.tp, p.pp, p.dp)
    assert (a["micro_batch_size"], a["global_batch_size"], a["seq_length"]) == \
        (p.micro_batch_size, p.global_batch_size, p.seq(model))
    if p.schedule == "interleaved":
        assert a["virtual_pipeline_model_parallel_size"] == p.virtual_stages
    if p.tp > 1:
        assert a["sequence_parallel"] == p.sequence_parallel
    assert a["grad_reduce_in_bf16"] == (p.gradient_dtype != "fp32")
    assert a["accumulate_allreduce_grads_in_fp32"] == (p.gradient_dtype == "fp32")
    assert a["bf16"] is True and (a["fp8"] is not None) == (p.precision == "fp8")
    ckpt = p.stage_checkpointed(model)
    granularity = "selective" if p.recompute in ("selective", "selective_op") else ("full" if any(ckpt) else None)
    assert a["recompute_granularity"] == granularity
    assert a["use_distributed_optimizer"] == (max(p.stage_zero()) >= 1 or any(o.optimizer for o in p.stage_offload()))
    assert (a["num_layers"], a["hidden_size"], a["num_attention_heads"], a["num_query_groups"] if a["group_query_attention"] else a["num_attention_heads"],
            a["ffn_hidden_size"], a["vocab_size"]) == (model.num_layers, model.hidden_size, model.num_attention_heads,
                                                       model.num_kv_heads, model.ffn_hidden_size, model.vocab_size)
    if model.position_embedding == "rope":
        assert a["rotary_base"] == int(model.rope_theta or 10000)
        assert a["use_rope_scaling"] == bool(model.rope_scaling_factor)
    return (f"tp {a['tensor_model_parallel_size']} pp {a['pipeline_model_parallel_size']} dp {a['data_parallel_size']}, "
            f"recompute {a['recompute_granularity']}, grads {'bf16' if a['grad_reduce_in_bf16'] else 'fp32'}, "
            f"rotary base {a['rotary_base']}")


def _titan_degrees(par: dict, model, p: TrainingPlan) -> None:
    assert par["data_parallel_replicate_degree"] * par["data_parallel_shard_degree"] == p.dp
    zero = max(p.stage_zero())
    if zero == 3 and p.dp > 1:
        assert par["data_parallel_shard_degree"] == p.shard_degree
    assert (par["tensor_parallel_degree"], par["pipeline_parallel_degree"]) == (p.tp, p.pp)
    if p.pp > 1:
        assert par["pipeline_parallel_microbatch_size"] == p.micro_batch_size
        schedule = {"gpipe": "GPipe", "1f1b": "1F1B", "interleaved": "Interleaved1F1B"}[p.schedule]
        assert par["pipeline_parallel_schedule"] == schedule
        parts = par["module_fqns_per_model_part"]
        assert len(parts) == p.pp * p.virtual_stages
        assert sum(len([m for m in part if m.startswith("layers.")]) for part in parts) == model.num_layers


def check_torchtitan(model, cluster, p: TrainingPlan, out: Path, tmp: Path) -> str:
    call = stub_call(out / "torchtitan.sh", tmp, "torchrun")
    argv = torchrun_program(call, cluster)
    assert argv[:2] == ["-m", "torchtitan.train"], argv
    c = probe(TRAIN_PY, "torchtitan03.py", str(out), *argv[2:])
    par, train = c["parallelism"], c["training"]
    _titan_degrees(par, model, p)
    if p.tp > 1:
        assert par["enable_sequence_parallel"] == p.sequence_parallel
    assert (train["global_batch_size"], train["seq_len"]) == (p.global_batch_size, p.seq(model))
    assert train["local_batch_size"] == (p.global_batch_size // p.dp if p.pp > 1 else p.micro_batch_size)
    assert train["disable_cuda_graphs"] == (p.pp > 1)
    ckpt = p.stage_checkpointed(model)
    ac = "SelectiveAC" if p.recompute in ("selective", "selective_op") else ("FullAC" if any(ckpt) else None)
    assert c["activation_checkpoint"] == ac
    m = c["model"]
    got = Architecture(m["layers"], m["dim"], m["heads"], m["kv_heads"], m["ffn"], m["vocab"],
                       float(m["rope_theta"]), m["rope_scaling_factor"], m["tied"])
    want = Architecture.of(model)
    want = Architecture(**{**want.__dict__, "rope_theta": float(want.rope_theta or 10000.0)})
    assert got == want, got.differences(want)
    return (f"dp {par['data_parallel_replicate_degree']}x{par['data_parallel_shard_degree']} tp "
            f"{par['tensor_parallel_degree']} pp {par['pipeline_parallel_degree']}, AC {ac}, "
            f"model '{m['flavor']}' (vocab {m['vocab']}, rope {m['rope_theta']:g})")


def check_torchtitan02(model, cluster, p: TrainingPlan, out: Path, tmp: Path) -> str:
    c = probe(TRAIN_PY, "torchtitan02.py", str(out / "torchtitan.toml"), pythonpath=(ENVS / "titan02",))
    par, train = c["parallelism"], c["training"]
    _titan_degrees(par, model, p)
    assert (train["global_batch_size"], train["seq_len"]) == (p.global_batch_size, p.seq(model))
    flavor = c["model"]["flavor"]
    assert flavors("0.2")[flavor] == Architecture.of(model)
    mode = c["activation_checkpoint"]["mode"]
    ckpt = p.stage_checkpointed(model)
    if p.recompute in ("selective", "selective_op"):
        assert (mode, c["activation_checkpoint"]["selective_ac_option"]) == ("selective", "op")
    elif not any(ckpt):
        assert mode == "none"
    else:
        assert mode in ("full", "selective")
    return (f"dp {par['data_parallel_replicate_degree']}x{par['data_parallel_shard_degree']} tp "
            f"{par['tensor_parallel_degree']} pp {par['pipeline_parallel_degree']}, AC {mode}, flavor '{flavor}'")


def check_deepspeed(model, cluster, p: TrainingPlan, out: Path, tmp: Path) -> str:
    c = probe(TRAIN_PY, "deepspeed_probe.py", str(out / "deepspeed_config.json"), str(p.dp), str(p.pp))
    assert (c["train_batch_size"], c["micro_batch"], c["accumulation"]) == \
        (p.global_batch_size, p.micro_batch_size, p.num_microbatches)
    zero = max(p.stage_zero())
    assert c["zero_stage"] == (min(zero, 1) if p.pp > 1 else zero)
    assert c["bf16"] is True
    if p.pp > 1:
        assert c["pipe_rule_found"] is True  # the engine's own rule was read and applied
    return f"batch {c['train_batch_size']} = {c['micro_batch']} x {c['accumulation']} x dp {p.dp}, ZeRO {c['zero_stage']}"


def check_executor(script: str, launcher: str):
    def check(model, cluster, p: TrainingPlan, out: Path, tmp: Path) -> str:
        call = stub_call(out / script, tmp, launcher if launcher == "torchrun" else "torchrun")
        argv = torchrun_program(call, cluster)
        assert argv[:2] == ["-m", "simtune.cli"] and argv[2:4] == ["run", "train"], argv
        done = subprocess.run([sys.executable, "-m", "simtune.cli", *argv[2:], "--dry-run", "--json"],
                              capture_output=True, text=True, cwd=out, timeout=600,
                              env={k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")})
        assert done.returncode == 0, done.stderr[-3000:]
        report = json.loads(done.stdout)
        d = report["degrees"]
        assert (d["tp"], d["pp"], d["dp"]) == (p.tp, p.pp, p.dp)
        assert report["parameters"] == report["predicted_parameters"]
        return f"simtune run train dry run: tp {d['tp']} pp {d['pp']} dp {d['dp']}, {report['parameters']:,} parameters"
    return check


CHECKS = {"megatron": check_megatron, "torchtitan": check_torchtitan, "torchtitan@0.2": check_torchtitan02,
          "deepspeed": check_deepspeed, "torchrun": check_executor("torchrun.sh", "torchrun"),
          "slurm": check_executor("job.slurm", "srun")}


@functools.cache
def training_case(name: str):
    model, cluster, make = TRAINING[name]
    return load_model(model), load_cluster(cluster), make()


@pytest.fixture(scope="module", autouse=True)
def report():
    yield
    lines = ["# Launch files checked by the engines' own parsers", "",
             "Written by `make check-launch` (tests/engines/check_launch.py); engines: torchtitan 0.3.0 and "
             "0.2.2, DeepSpeed 0.19.8, Megatron-LM arguments of megatron-core 0.19.2, torchrun of torch "
             "2.13.0, vLLM 0.32.0 (CPU build).", "",
             "| case | engine | result | parsed |", "|---|---|---|---|"]
    lines += [f"| {c} | {e} | {o} | {d.replace('|', '/')} |" for c, e, o, d in RESULTS]
    REPORT.write_text("\n".join(lines) + "\n", encoding="utf-8")


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("case", list(TRAINING))
def test_training_launch_files_parse_and_match_the_plan(case, engine, tmp_path):
    model, cluster, p = training_case(case)
    must_refuse = expected_refusal(engine, model, p)
    try:
        files = render(model, cluster, p, [engine])
    except EngineRefusal as err:
        RESULTS.append((case, engine, "refused", str(err.allowed)[:160] + "..."))
        assert must_refuse, f"unexpected refusal: {err}"
        return
    assert must_refuse is None, f"should have refused ({must_refuse})"
    if engine == "torchtitan" and p.precision == "fp8":
        RESULTS.append((case, engine, "written, not parsed", "torchtitan 0.3 builds the float8 converter "
                        "when the job is made: it needs an SM89+ GPU and torchao"))
        pytest.skip("torchtitan 0.3's float8 converter needs an SM89+ GPU to build the config")
    out = tmp_path / "out"
    write_files(files, out)
    detail = CHECKS[engine](model, cluster, p, out, tmp_path)
    approx = sum(len(f.approximations) for f in files if not f.path.name.endswith((".yaml", ".txt")))
    RESULTS.append((case, engine, "parsed, matches the plan", f"{detail}; {approx} approximation(s) in the header"))


@pytest.mark.parametrize("case", list(SERVING))
def test_vllm_flags_parse_and_match_the_deployment(case, tmp_path):
    model_name, cluster_name, dep = SERVING[case]
    model, cluster = load_model(model_name), load_cluster(cluster_name)
    deployment = load_deployment(dep) if isinstance(dep, str) else DeploymentSpec.parse(dep)
    emit_serving_configs(model, cluster, deployment, ["vllm"], tmp_path / "out")
    call = launch_stubs.run_with_stubs(tmp_path / "out" / "vllm_serve.sh", tmp_path, {"vllm": LOG},
                                       unset=("MASTER_ADDR", "MASTER_PORT", "NODE_RANK"))
    assert call[0] == "serve"
    a = probe(VLLM_PY, "vllm_probe.py", *call[1:])
    layout = deployment.prefill
    assert (a["tensor_parallel_size"], a["pipeline_parallel_size"]) == (layout.tp, layout.pp)
    assert a["data_parallel_size"] == deployment.dp
    assert a["enable_prefix_caching"] is deployment.prefix_caching
    if deployment.speculation is not None:
        config = a["speculative_config"]
        assert config["method"] == ("ngram" if deployment.speculation.draft == "ngram" else "draft_model")
        assert config["num_speculative_tokens"] >= 1
    RESULTS.append((case, "vllm", "parsed, matches the deployment",
                    f"tp {a['tensor_parallel_size']} pp {a['pipeline_parallel_size']} dp {a['data_parallel_size']}, "
                    f"max_num_seqs {a['max_num_seqs']}, speculative {a['speculative_config']}"))
