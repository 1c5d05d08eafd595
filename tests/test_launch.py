"""Launch configurations: every engine's files are written atomically, parse, carry the plan's
degrees, list what the engine cannot express, and the plan file loads back unchanged.

Shell scripts are run for real with stub `torchrun`, `srun` and `scontrol` on PATH that print
their arguments, so the argument arrays are checked as bash expands them.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import tomllib
from pathlib import Path

import launch_stubs
import pytest
from launch_stubs import BASH, LOG, assert_written_atomically, flags

from executor.launch import ENGINES, EngineRefusal, check_engines, emit_launch_configs, render
from simulator.errors import SpecError
from simulator.specs import TrainingPlan, load_cluster, load_model, load_plan

SHELL = ("megatron_args.sh", "torchtitan.sh", "torchrun.sh", "job.slurm")


def llama_plan(**changes) -> TrainingPlan:
    """ZeRO-3 + half the optimizer offloaded, full recompute, uneven stages checkpointed unevenly."""
    plan = dict(
        name="llama-zero3-offload", pp=2, dp=4, micro_batch_size=1, global_batch_size=32,
        zero_stage=3, recompute="full", offload={"optimizer": 0.5},
        stages=[{"layers": 15, "checkpointed_layers": 15}, {"layers": 17, "checkpointed_layers": 8}],
    )
    return TrainingPlan.parse({**plan, **changes})


CASES = {
    "gpt3-175b": (load_model("gpt3-175b"), load_cluster("16x8xa100-80gb"), load_plan("megatron-gpt3-175b")),
    "llama-3-8b": (load_model("llama-3-8b"), load_cluster("8xh100"), llama_plan()),
}
# What each case writes: torchtitan refuses a GPT; torchtitan 0.2 has no flavor that is
# Llama-3-8B (its flavors are Llama 3.1's); simtune's executor (torchrun, slurm) refuses the
# llama plan's half-offloaded optimizer.
FILES = {
    "gpt3-175b": {"megatron_args.sh", "deepspeed_config.json", "deepspeed_config.notes.txt",
                  "torchrun.sh", "plan.yaml", "job.slurm"},
    "llama-3-8b": {"megatron_args.sh", "torchtitan_job.py", "torchtitan.sh", "deepspeed_config.json",
                   "deepspeed_config.notes.txt"},
}
REFUSED = {"gpt3-175b": ["torchtitan", "torchtitan@0.2"], "llama-3-8b": ["torchtitan@0.2", "torchrun", "slurm"]}


@pytest.fixture(params=list(CASES))
def case(request, tmp_path):
    model, cluster, plan = CASES[request.param]
    refused = []
    files = emit_launch_configs(model, cluster, plan, ENGINES, tmp_path / "out", refused=refused)
    assert [r.value for r in refused] == REFUSED[request.param]
    return model, cluster, plan, {f.path.name: f for f in files}, tmp_path / "out"


def approximations(model, cluster, plan, engine: str) -> list[str]:
    return [a for f in render(model, cluster, plan, [engine]) for a in f.approximations]


def run_with_stubs(script: Path, tmp_path: Path) -> list[str]:
    """Run `script` with stub launchers; return the stub torchrun call's arguments."""
    stubs = {"torchrun": LOG, "srun": 'exec "$@"', "scontrol": "printf 'node-a\\nnode-b\\n'"}
    return launch_stubs.run_with_stubs(script, tmp_path, stubs, unset=("MASTER_ADDR", "MASTER_PORT"),
                                       env={"SLURM_JOB_NODELIST": "node-[a-b]"})


# --- every file -----------------------------------------------------------------------------


def test_every_engine_file_is_written_atomically(case):
    model, cluster, plan, files, out = case
    assert_written_atomically(files, out, FILES[model.name], set(SHELL))


def test_files_open_with_a_simtune_header(case):
    model, cluster, plan, files, out = case
    for name, f in files.items():
        if name.endswith(".json"):
            continue  # JSON has no comments: its notes file carries the header
        lines = f.text.splitlines()
        head = lines[1:4] if lines[0].startswith("#!") else lines[:3]
        assert "simtune" in head[0]
        assert model.name in head[1] and cluster.name in head[1]
        assert plan.name in head[2] and f"tp {plan.tp}, pp {plan.pp}, dp {plan.dp}" in head[2]


def test_writing_is_deterministic(case, tmp_path):
    model, cluster, plan, files, out = case
    again = emit_launch_configs(model, cluster, plan, ENGINES, tmp_path / "again", refused=[])
    assert {f.path.name: f.text for f in again} == {n: f.text for n, f in files.items()}


@pytest.mark.skipif(BASH is None, reason="needs bash")
def test_shell_scripts_pass_bash_n(case):
    *_, files, out = case
    for name in set(SHELL) & set(files):
        subprocess.run([BASH, "-n", str(out / name)], check=True)
        # arrays expand as ${A[@]+"${A[@]}"}: a bare "${A[@]}" of an empty array fails set -u before bash 4.4
        assert re.search(r'(?<!\+)"\$\{\w+\[@\]\}"', files[name].text) is None


def test_plan_yaml_loads_back_to_the_same_plan(tmp_path):
    model, cluster, plan = CASES["gpt3-175b"]
    emit_launch_configs(model, cluster, plan, ["torchrun"], tmp_path)
    assert load_plan(str(tmp_path / "plan.yaml")) == plan


# --- per engine -----------------------------------------------------------------------------


@pytest.mark.skipif(BASH is None, reason="needs bash")
def test_megatron_arguments_parse_back(case, tmp_path):
    model, cluster, plan, files, out = case
    call = run_with_stubs(out / "megatron_args.sh", tmp_path)
    program = call.index("./pretrain_gpt.py")
    launcher, args = flags(call[:program]), flags(call[program + 1:])
    assert launcher["--nnodes"] == str(cluster.num_nodes)
    assert launcher["--nproc-per-node"] == str(cluster.devices_per_node)
    assert launcher["--rdzv-endpoint"] == "localhost:29500"
    assert args["--num-layers"] == str(model.num_layers)
    assert args["--tensor-model-parallel-size"] == str(plan.tp)
    assert args["--pipeline-model-parallel-size"] == str(plan.pp)
    assert args["--micro-batch-size"] == "1"
    assert args["--global-batch-size"] == str(plan.global_batch_size)
    assert args["--use-distributed-optimizer"] is True
    # the plan's gradient precision (Megatron's default with --bf16 is fp32)
    fp32 = plan.gradient_dtype == "fp32"
    assert ("--accumulate-allreduce-grads-in-fp32" in args, "--grad-reduce-in-bf16" in args) == (fp32, not fp32)
    if model.name == "gpt3-175b":
        assert args["--num-layers-per-virtual-pipeline-stage"] == "4"  # 96 / (8 x 3)
        assert args["--recompute-granularity"] == "selective"
        assert args["--sequence-parallel"] is True
        assert "--recompute-method" not in args and "--swiglu" not in args
    else:
        assert "--num-layers-per-virtual-pipeline-stage" not in args
        assert args["--decoder-first-pipeline-num-layers"] == "15"
        assert (args["--recompute-granularity"], args["--recompute-method"]) == ("full", "block")
        assert args["--recompute-num-layers"] == "15"  # the max over stages
        assert args["--group-query-attention"] is True and args["--num-query-groups"] == "8"
        assert args["--optimizer-offload-fraction"] == "0.5"
        for switch in ("--swiglu", "--disable-bias-linear", "--untie-embeddings-and-output-weights"):
            assert args[switch] is True
        assert args["--normalization"] == "RMSNorm"
        assert args["--rotary-base"] == "500000" and "--use-rope-scaling" not in args  # Llama 3, not 3.1


def test_megatron_writes_llama31_rope_scaling():
    model, cluster = load_model("llama-3.1-8b"), load_cluster("8xh100")
    [f] = render(model, cluster, llama_plan(), ["megatron"])
    assert "--rotary-base 500000\n" in f.text
    assert "--use-rope-scaling\n" in f.text and "--rope-scaling-factor 8\n" in f.text


def test_megatron_fp32_gradients():
    model, cluster = load_model("llama-3.1-8b"), load_cluster("8xh100")
    [f] = render(model, cluster, llama_plan(gradient_dtype="fp32"), ["megatron"])
    assert "--accumulate-allreduce-grads-in-fp32\n" in f.text and "--grad-reduce-in-bf16" not in f.text


def load_job(text: str) -> str:
    compile(text, "torchtitan_job.py", "exec")  # Python, whatever torchtitan says of it
    return text


@pytest.mark.skipif(BASH is None, reason="needs bash")
def test_torchtitan_job_and_command_carry_the_plan(tmp_path):
    model, cluster, plan = CASES["llama-3-8b"]
    files = {f.path.name: f for f in emit_launch_configs(model, cluster, plan, ["torchtitan"], tmp_path / "out")}
    assert set(files) == {"torchtitan_job.py", "torchtitan.sh"}
    job = load_job(files["torchtitan_job.py"].text)
    for line in ("data_parallel_shard_degree=4,", "pipeline_parallel_degree=2,", "tensor_parallel_degree=1,",
                 "pipeline_parallel_schedule='1F1B',", "pipeline_parallel_microbatch_size=1,",
                 "global_batch_size=32,", "local_batch_size=8,", "disable_cuda_graphs=True,",
                 "enable_cpu_offload=True,", "activation_checkpoint=FullAC.Config(),"):
        assert line in job.replace('"', "'"), line
    # Llama-3-8B is not torchtitan's "8B" (Llama 3.1: RoPE scaling): a custom block, exact
    assert "model_registry" not in job and "def model_llama_3_8b() -> ModelSpec:" in job
    assert "vocab_size=128256," in job and 'theta=500000.0, scaling="none"' in job
    assert "n_kv_heads=8," in job and "hidden_dim=14336," in job
    parts = job[job.index("module_fqns_per_model_part="):]
    assert "'layers.14', 'lm_head'" not in parts and "'layers.31', 'norm', 'lm_head'" in parts
    call = launch_stubs.run_with_stubs(tmp_path / "out" / "torchtitan.sh", tmp_path, {"torchrun": LOG},
                                       unset=("MASTER_ADDR", "MASTER_PORT", "PYTHONPATH"))
    program = call.index("-m")
    assert call[program:program + 6] == ["-m", "torchtitan.train", "--module", "torchtitan_job",
                                         "--config", "simtune_job"]
    assert flags(call[program + 6:]) == {"--dump_folder": "./outputs", "--hf_assets_path": "./assets/hf/tokenizer",
                                         "--dataloader.dataset": "c4_test", "--training.steps": "100"}
    found = files["torchtitan_job.py"].approximations
    assert any("every layer or none" in a and "[15, 8]" in a for a in found)


def test_torchtitan_uses_a_flavor_only_when_it_is_the_model():
    cluster = load_cluster("8xh100")
    flavored = render(load_model("llama-3.1-8b"), cluster, llama_plan(), ["torchtitan", "torchtitan@0.2"])
    job, toml = (next(f.text for f in flavored if f.path.name == n) for n in ("torchtitan_job.py", "torchtitan.toml"))
    assert 'model_spec = model_registry("8B")' in load_job(job)
    assert tomllib.loads(toml)["model"] == {"name": "llama3", "flavor": "8B"}
    # Llama 3.2 1B scales RoPE by 32, torchtitan's "1B" by 8: not the same model
    job = render(load_model("llama-3.2-1b"), cluster, llama_plan(stages=None, pp=1, dp=8), ["torchtitan"])[0].text
    assert 'scaling="llama", scaling_factor=32.0' in load_job(job) and "enable_weight_tying=True," in job


def test_llama2_70b_gets_its_own_block_on_torchtitan_and_a_named_refusal_on_02():
    model, cluster = load_model("llama-2-70b"), load_cluster("4x8xa100-80gb")
    plan = TrainingPlan.parse({"dp": 32, "global_batch_size": 128, "zero_stage": 3})
    job = render(model, cluster, plan, ["torchtitan"])[0].text
    assert "vocab_size=32000," in load_job(job) and 'theta=10000.0, scaling="none"' in job
    with pytest.raises(EngineRefusal) as info:
        render(model, cluster, plan, ["torchtitan@0.2"])
    message = str(info.value)
    assert info.value.value == "torchtitan@0.2" and "'70B' differs in" in message
    assert "vocab 32000 vs 128256" in message and "rope_theta 10000.0 vs 500000.0" in message


def test_torchtitan_refuses_a_gpt_before_any_search():
    model = load_model("gpt3-13b")
    for engine in ("torchtitan", "torchtitan@0.2"):
        with pytest.raises(EngineRefusal, match="no gelu MLP, LayerNorm, biases, learned positions"):
            check_engines(model, ["megatron", engine])
    assert check_engines(model, ["megatron", "deepspeed"]) == ["megatron", "deepspeed"]


def test_torchtitan02_toml_has_the_plans_degrees():
    model, cluster = load_model("llama-3.1-8b"), load_cluster("8xh100")
    [f] = render(model, cluster, llama_plan(), ["torchtitan@0.2"])
    assert "# For torchtitan 0.2.x only" in f.text
    cfg = tomllib.loads(f.text)
    par = cfg["parallelism"]
    assert (par["pipeline_parallel_degree"], par["data_parallel_shard_degree"]) == (2, 4)
    assert [len([m for m in p if m.startswith("layers.")]) for p in par["module_fqns_per_model_part"]] == [15, 17]
    assert par["module_fqns_per_model_part"][-1][-2:] == ["norm", "output"]
    assert cfg["training"]["local_batch_size"] * 4 == cfg["training"]["global_batch_size"] == 32
    assert cfg["activation_checkpoint"]["mode"] == "full"  # 15 of 15 on stage 0: every layer


def test_deepspeed_json_batches_add_up(case):
    model, cluster, plan, files, out = case
    cfg = json.loads((out / "deepspeed_config.json").read_text())
    assert cfg["train_batch_size"] == plan.global_batch_size
    micro, accum = cfg["train_micro_batch_size_per_gpu"], cfg["gradient_accumulation_steps"]
    assert micro * accum * plan.dp == plan.global_batch_size
    # DeepSpeed's pipeline engine takes ZeRO 0 or 1 only
    assert cfg["zero_optimization"]["stage"] == (min(plan.zero_stage, 1) if plan.pp > 1 else plan.zero_stage)
    assert cfg["bf16"]["enabled"] is True
    notes = (out / "deepspeed_config.notes.txt").read_text()
    assert all(a in notes.replace("\n    ", " ") for a in files["deepspeed_config.json"].approximations)
    assert f"data-parallel size {plan.dp}" in notes.replace("\n", " ")
    assert f"--tensor-model-parallel-size {plan.tp} --pipeline-model-parallel-size {plan.pp}" in notes


def test_deepspeed_with_pipeline_parallel_and_stagewise_zero_writes_zero1_and_says_so():
    model, cluster = load_model("llama-3.1-8b"), load_cluster("8xh100")
    plan = llama_plan(zero_stage=1, offload={}, stages=[{"layers": 16, "zero_stage": 2}, {"layers": 16, "zero_stage": 1}])
    [config, notes] = render(model, cluster, plan, ["deepspeed"])
    assert json.loads(config.text)["zero_optimization"]["stage"] == 1
    [note] = [a for a in config.approximations if "pipeline engine" in a and "ZeRO" in a]
    assert "[2, 1] written as stage 1" in note and "1/4" in note
    three = render(model, cluster, llama_plan(), ["deepspeed"])[0]
    assert json.loads(three.text)["zero_optimization"]["stage"] == 1
    assert any("gradients and weights stay whole" in a for a in three.approximations)
    flat = render(model, cluster, llama_plan(pp=1, dp=8, stages=None), ["deepspeed"])[0]
    assert json.loads(flat.text)["zero_optimization"]["stage"] == 3  # no pipeline: as planned


@pytest.mark.skipif(BASH is None, reason="needs bash")
@pytest.mark.parametrize("script", ["torchrun.sh", "job.slurm"])
def test_torchrun_and_slurm_launch_simtunes_executor_on_the_plan(tmp_path, script):
    model, cluster, plan = CASES["gpt3-175b"]
    files = {f.path.name: f for f in emit_launch_configs(model, cluster, plan, ["torchrun", "slurm"], tmp_path / "out")}
    out = tmp_path / "out"
    call = run_with_stubs(out / script, tmp_path)
    program = call.index("-m")
    assert call[program:program + 4] == ["-m", "simtune.cli", "run", "train"]
    launcher, args = flags(call[:program]), flags(call[program + 4:])
    assert launcher["--nnodes"] == str(cluster.num_nodes)
    assert launcher["--nproc-per-node"] == str(cluster.devices_per_node)
    assert launcher["--rdzv-backend"] == "c10d"
    assert launcher["--rdzv-endpoint"] == ("node-a:29500" if script == "job.slurm" else "localhost:29500")
    assert args == {"--model": model.name, "--cluster": cluster.name, "--plan": "plan.yaml"}
    if script == "job.slurm":
        text = files[script].text
        for line in (f"--nodes={cluster.num_nodes}", "--ntasks-per-node=1",
                     f"--gpus-per-node={cluster.devices_per_node}", "--exclusive",
                     f"--job-name=simtune-{model.name}"):
            assert f"#SBATCH {line}\n" in text


def test_the_executor_refuses_a_plan_it_cannot_run_exactly(tmp_path):
    model, cluster, plan = CASES["llama-3-8b"]  # half the optimizer offloaded
    with pytest.raises(EngineRefusal, match=r"cannot run this plan exactly .*offload.optimizer = 0.5"):
        emit_launch_configs(model, cluster, plan, ["megatron", "torchrun"], tmp_path / "out")
    assert not (tmp_path / "out").exists()
    own = {f.path.name for f in emit_launch_configs(model, cluster, plan, ["torchrun"], tmp_path / "own",
                                                    script="my_train.py")}
    assert own == {"torchrun.sh", "plan.yaml"}  # a user's own script may take the plan as it is
    assert "my_train.py --model llama-3-8b" in (tmp_path / "own" / "torchrun.sh").read_text()


def test_a_model_outside_the_catalog_travels_as_yaml(tmp_path):
    model, cluster, _ = CASES["llama-3-8b"]
    plan = llama_plan(offload={"optimizer": 1.0})
    mine = model.model_copy(update={"name": "my-llama"})
    files = {f.path.name: f for f in emit_launch_configs(mine, cluster, plan, ["torchrun"], tmp_path)}
    assert set(files) == {"torchrun.sh", "plan.yaml", "model.yaml"}
    assert "--model model.yaml --cluster 8xh100" in files["torchrun.sh"].text
    assert load_model(str(tmp_path / "model.yaml")) == mine


# --- approximations -------------------------------------------------------------------------


def test_megatron_records_what_it_cannot_express():
    model, cluster, plan = CASES["llama-3-8b"]
    found = approximations(model, cluster, plan, "megatron")
    assert any("no ZeRO-3" in a and "--use-distributed-optimizer" in a for a in found)
    assert any("checkpointed layers ([15, 8])" in a for a in found)
    text = render(model, cluster, plan, ["megatron"])[0].text
    assert "# Approximations (plan features Megatron-LM cannot express):" in text


def test_megatron_uneven_stages():
    model, cluster = load_model("llama-3-8b"), load_cluster("8xh100")
    first_last = llama_plan(pp=4, dp=2, stages=[{"layers": 7}, {"layers": 8}, {"layers": 8}, {"layers": 9}])
    [f] = render(model, cluster, first_last, ["megatron"])
    assert "--decoder-first-pipeline-num-layers 7\n" in f.text
    assert "--decoder-last-pipeline-num-layers 9\n" in f.text
    assert not any("first and last" in a for a in f.approximations)
    ragged = llama_plan(pp=4, dp=2, stages=[{"layers": 8}, {"layers": 7}, {"layers": 9}, {"layers": 8}])
    [f] = render(model, cluster, ragged, ["megatron"])
    assert "--decoder-first-pipeline-num-layers" not in f.text
    assert any("only make the first and last stage differ" in a for a in f.approximations)


def test_deepspeed_offloads_part_of_the_optimizer_only_under_zero3():
    model, cluster, _ = CASES["llama-3-8b"]
    zero2 = llama_plan(zero_stage=2, pp=1, dp=8, stages=None)
    files = render(model, cluster, zero2, ["deepspeed"])
    cfg = json.loads(files[0].text)
    assert cfg["zero_optimization"]["offload_optimizer"] == {"device": "cpu", "pin_memory": True}
    assert any("all or nothing: optimizer fraction 0.5" in a for a in files[0].approximations)
    zero3 = approximations(model, cluster, llama_plan(pp=1, dp=8, stages=None), "deepspeed")
    assert not any("optimizer fraction" in a for a in zero3)


def test_torchtitan_records_zero1():
    model, cluster = load_model("llama-3.1-70b"), load_cluster("16x8xa100-80gb")
    found = approximations(model, cluster, load_plan("megatron-gpt3-175b").model_copy(update={"name": "z1"}), "torchtitan")
    assert any("no ZeRO-1" in a for a in found)


@pytest.mark.parametrize("engine, plan", [
    ("megatron", "megatron-gpt3-175b"),
    ("torchtitan", {"dp": 8, "global_batch_size": 32, "zero_stage": 3, "recompute": "full",
                    "gradient_dtype": "fp32"}),
    ("deepspeed", {"dp": 8, "global_batch_size": 32, "zero_stage": 1}),
    ("torchrun", "megatron-gpt3-175b"),
    ("slurm", "megatron-gpt3-175b"),
])
def test_no_approximations_when_the_engine_expresses_the_plan(engine, plan):
    model, cluster = (
        CASES["gpt3-175b"][:2] if plan == "megatron-gpt3-175b"
        else (load_model("llama-3-8b"), load_cluster("8xh100"))
    )
    files = render(model, cluster, load_plan(plan), [engine])
    assert [a for f in files for a in f.approximations] == []
    assert "Every plan feature is expressed exactly." in "".join(f.text for f in files)


# --- errors ---------------------------------------------------------------------------------


def test_unknown_engine_raises_before_writing(tmp_path):
    with pytest.raises(SpecError) as info:
        emit_launch_configs(*CASES["llama-3-8b"], ["megatron", "vllm"], tmp_path / "out")
    assert info.value.field == "emit" and info.value.value == "vllm"
    assert "allowed: megatron, torchtitan, torchtitan@0.2, deepspeed, torchrun, slurm" in str(info.value)
    assert not (tmp_path / "out").exists()


def test_a_plan_that_does_not_fill_the_cluster_is_refused(tmp_path):
    model, _, plan = CASES["llama-3-8b"]
    with pytest.raises(SpecError, match="devices"):
        emit_launch_configs(model, load_cluster("16x8xa100-80gb"), plan, ENGINES, tmp_path)


def test_a_failed_write_leaves_no_temporary_file(tmp_path, monkeypatch):
    def refuse(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(OSError, match="disk full"):
        emit_launch_configs(*CASES["llama-3-8b"], ["torchtitan"], tmp_path)
    assert list(tmp_path.iterdir()) == []


# --- sharded data parallel ------------------------------------------------------------------


def hsdp_plan(**changes) -> TrainingPlan:
    """ZeRO-3 sharded over one node of 8, replicated over 2 nodes, weights kept gathered across
    micro-batches, fp8 linears with fp8 all-gathers, every layer checkpointed."""
    plan = dict(name="llama-hsdp-fp8", dp=16, dp_shard=8, micro_batch_size=1, global_batch_size=64,
                zero_stage=3, reshard_after_forward=False, reshard_between_microbatches=False,
                precision="fp8", fp8_all_gather=True, recompute="full")
    return TrainingPlan.parse({**plan, **changes})


HSDP = (load_model("llama-3.1-8b"), load_cluster("2x8xh100"))


def test_torchtitan_writes_hsdp_resharding_and_float8(tmp_path):
    files = {f.path.name: f for f in emit_launch_configs(*HSDP, hsdp_plan(), ["torchtitan", "torchtitan@0.2"], tmp_path)}
    cfg = tomllib.loads((tmp_path / "torchtitan.toml").read_text())
    par = cfg["parallelism"]
    assert (par["data_parallel_shard_degree"], par["data_parallel_replicate_degree"]) == (8, 2)
    assert par["fsdp_reshard_after_forward"] == "never"
    assert cfg["model"]["converters"] == ["quantize.linear.float8"]
    assert cfg["quantize"]["linear"]["float8"]["enable_fsdp_float8_all_gather"] is True
    found = files["torchtitan.toml"].approximations
    assert any("reshard_between_microbatches false" in a for a in found)
    assert not any("dp_shard" in a or "reshard_after_forward" in a for a in found)
    job = load_job(files["torchtitan_job.py"].text)
    assert "converters=[Float8LinearConverter.Config(model_compile_enabled=False)]" in job
    assert "data_parallel_shard_degree=8," in job and "data_parallel_replicate_degree=2," in job
    assert any("no fp8 all-gather setting" in a for a in files["torchtitan_job.py"].approximations)
    default = render(*HSDP, hsdp_plan(dp_shard=None, reshard_after_forward=True), ["torchtitan@0.2"])[0]
    par = tomllib.loads(default.text)["parallelism"]
    assert (par["data_parallel_shard_degree"], par["data_parallel_replicate_degree"]) == (16, 1)
    assert par["fsdp_reshard_after_forward"] == "always"


def test_deepspeed_writes_hpz_and_says_it_is_not_hsdp():
    files = render(*HSDP, hsdp_plan(), ["deepspeed"])
    cfg = json.loads(files[0].text)
    assert cfg["zero_optimization"]["stage"] == 3
    assert cfg["zero_optimization"]["zero_hpz_partition_size"] == 8
    found = files[0].approximations
    hpz = next(a for a in found if "zero_hpz_partition_size 8" in a)
    assert "no HSDP" in hpz and "backward all-gathers" in hpz and "all 16 ranks" in hpz
    for what in ("reshard_after_forward false", "reshard_between_microbatches false",
                 "regather_for_recompute false", "precision fp8"):
        assert any(what in a for a in found), what
    assert all(a in files[1].text.replace("\n    ", " ") for a in found)  # the notes file
    plain = json.loads(render(*HSDP, hsdp_plan(dp_shard=None), ["deepspeed"])[0].text)
    assert "zero_hpz_partition_size" not in plain["zero_optimization"]


@pytest.mark.skipif(BASH is None, reason="needs bash")
def test_megatron_writes_megatron_fsdp_hsdp_and_fp8(tmp_path):
    emit_launch_configs(*HSDP, hsdp_plan(), ["megatron"], tmp_path / "out")
    script = tmp_path / "out" / "megatron_args.sh"
    call = run_with_stubs(script, tmp_path)
    args = flags(call[call.index("./pretrain_gpt.py") + 1:])
    assert args["--use-megatron-fsdp"] is True and args["--use-distributed-optimizer"] is True
    assert args["--data-parallel-sharding-strategy"] == "optim_grads_params"
    assert args["--ckpt-format"] == "fsdp_dtensor"
    assert args["--num-distributed-optimizer-instances"] == "2"  # 16 ranks / shard groups of 8
    assert (args["--fp8-format"], args["--fp8-recipe"]) == ("hybrid", "tensorwise")
    assert args["--fp8-param-gather"] is True
    text = script.read_text()
    assert "unset CUDA_DEVICE_MAX_CONNECTIONS" in text and "CUDA_DEVICE_MAX_CONNECTIONS=1" not in text
    found = approximations(*HSDP, hsdp_plan(), "megatron")
    assert any("reshard_after_forward false" in a for a in found)
    assert any("reshard_between_microbatches false" in a for a in found)
    assert not any("ZeRO-3" in a for a in found)
    piped = approximations(*HSDP, hsdp_plan(pp=2, dp=8, dp_shard=4), "megatron")
    assert any("no ZeRO-3 with pipeline parallelism" in a and "dp_shard 4" in a for a in piped)


def test_sharded_plan_yaml_resimulates_unchanged(tmp_path):
    from simulator.training import simulate_training

    plan = hsdp_plan(precision="bf16", fp8_all_gather=False)
    emit_launch_configs(*HSDP, plan, ["torchrun"], tmp_path)
    again = load_plan(str(tmp_path / "plan.yaml"))
    assert again == plan and again.dp_shard == 8 and not again.reshard_between_microbatches
    assert (simulate_training(*HSDP, again).iteration_time_s
            == simulate_training(*HSDP, plan).iteration_time_s)
