"""Serving launch configurations: vLLM and SGLang scripts are written atomically, parse, carry
the deployment's static layout, list what the engine cannot express, and deployment.yaml loads
back unchanged.

The scripts are run for real with stub `vllm` and `python` on PATH that print their
arguments, so the ARGS arrays are checked as bash expands them.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import launch_stubs
import pytest
from launch_stubs import BASH, LOG, assert_written_atomically, flags, needs_bash

from executor.launch.serving import ENGINES, emit_serving_configs, render_serving
from simulator.errors import SpecError
from simulator.specs import DeploymentSpec, load_cluster, load_deployment, load_model

FILES = {"vllm_serve.sh", "sglang_serve.sh", "deployment.yaml"}
SHELL = ("vllm_serve.sh", "sglang_serve.sh")

CASES = {
    "static-dp2": ("llama-2-70b", "8xa100-80gb", {"prefill": {"tp": 4}, "dp": 2}),
    "seesaw": ("llama-2-13b", "4xl4", "seesaw-pp4-tp4"),
}


def specs(model: str, cluster: str, deployment):
    return load_model(model), load_cluster(cluster), load_deployment(deployment)


@pytest.fixture(params=list(CASES))
def case(request, tmp_path):
    model, cluster, deployment = specs(*CASES[request.param])
    files = emit_serving_configs(model, cluster, deployment, ENGINES, tmp_path / "out")
    return model, cluster, deployment, {f.path.name: f for f in files}, tmp_path / "out"


def run_with_stubs(script: Path, tmp_path: Path) -> list[str]:
    """Run `script` with stub `vllm` and `python`; return the arguments the stub was given."""
    return launch_stubs.run_with_stubs(script, tmp_path, {"vllm": LOG, "python": LOG}, args=("--port", "8001"),
                                       unset=("MASTER_ADDR", "MASTER_PORT", "NODE_RANK"))


def vllm_call(out: Path, tmp_path: Path) -> tuple[str, dict[str, str | bool]]:
    call = run_with_stubs(out / "vllm_serve.sh", tmp_path)
    assert call[0] == "serve"
    return call[1], flags(call[2:])


def sglang_call(out: Path, tmp_path: Path) -> dict[str, str | bool]:
    call = run_with_stubs(out / "sglang_serve.sh", tmp_path)
    assert call[:2] == ["-m", "sglang.launch_server"]
    return flags(call[2:])


def approximations(model, cluster, deployment, engine: str) -> list[str]:
    return [a for f in render_serving(model, cluster, deployment, [engine]) for a in f.approximations]


# --- every file -----------------------------------------------------------------------------


def test_files_are_written_atomically(case):
    *_, files, out = case
    assert_written_atomically(files, out, FILES, SHELL)


def test_files_open_with_a_simtune_header(case):
    model, cluster, deployment, files, out = case
    for f in files.values():
        lines = f.text.splitlines()
        head = lines[1:4] if lines[0].startswith("#!") else lines[:3]
        assert "simtune" in head[0]
        assert model.name in head[1] and cluster.name in head[1]
        assert head[2].startswith(f"# deployment {deployment.name or '(unnamed)'}: dp {deployment.dp}")


def test_writing_is_deterministic(case, tmp_path):
    model, cluster, deployment, files, out = case
    again = emit_serving_configs(model, cluster, deployment, ENGINES, tmp_path / "again")
    assert {f.path.name: f.text for f in again} == {n: f.text for n, f in files.items()}


@needs_bash
def test_scripts_pass_bash_n(case):
    *_, files, out = case
    for name in SHELL:
        subprocess.run([BASH, "-n", str(out / name)], check=True)


def test_deployment_yaml_loads_back_to_the_same_deployment(case):
    *_, deployment, files, out = case
    assert load_deployment(str(out / "deployment.yaml")) == deployment


# --- flags ----------------------------------------------------------------------------------


@needs_bash
def test_vllm_flags_parse_back(case, tmp_path):
    model, cluster, deployment, files, out = case
    model_arg, args = vllm_call(out, tmp_path)
    p = deployment.prefill
    assert model_arg == model.name  # the placeholder
    assert args["--tensor-parallel-size"] == str(p.tp)
    assert args["--pipeline-parallel-size"] == str(p.pp)
    assert args.get("--data-parallel-size") == (str(deployment.dp) if deployment.dp > 1 else None)
    assert args["--max-num-seqs"] == str(deployment.max_num_seqs)
    assert args["--max-num-batched-tokens"] == str(deployment.max_batched_tokens)
    assert args["--no-enable-chunked-prefill"] is True and "--enable-chunked-prefill" not in args
    assert args["--block-size"] == str(deployment.block_size)
    assert args["--gpu-memory-utilization"] == "0.9"
    assert args["--dtype"] == "float16"
    assert args["--no-enable-prefix-caching"] is True and "--enable-prefix-caching" not in args
    assert args["--port"] == "8001"  # the script's own arguments pass through
    assert "--swap-space" not in args and "--distributed-executor-backend" not in args


@needs_bash
def test_sglang_flags_parse_back(case, tmp_path):
    model, cluster, deployment, files, out = case
    args = sglang_call(out, tmp_path)
    p = deployment.prefill
    assert args["--model-path"] == model.name
    assert args["--tp-size"] == str(p.tp)
    assert args.get("--pp-size") == (str(p.pp) if p.pp > 1 else None)
    assert args["--dp-size"] == str(deployment.dp)
    assert args["--max-running-requests"] == str(deployment.max_num_seqs)
    assert args["--chunked-prefill-size"] == "-1"
    assert args["--max-prefill-tokens"] == str(deployment.max_batched_tokens)
    assert args["--mem-fraction-static"] == "0.9"
    assert args["--page-size"] == str(deployment.block_size)
    assert args["--dtype"] == "float16"
    assert args["--disable-radix-cache"] is True
    assert args["--port"] == "8001"
    assert "--enable-mixed-chunk" not in args and "--nnodes" not in args


@needs_bash
def test_sarathi_chunks_become_the_engines_chunks(tmp_path):
    model, cluster, deployment = specs("llama-2-13b", "4xl4", "sarathi-tp4")
    out = tmp_path / "out"
    emit_serving_configs(model, cluster, deployment, ENGINES, out)
    _, vllm = vllm_call(out, tmp_path)
    assert vllm["--enable-chunked-prefill"] is True and "--no-enable-chunked-prefill" not in vllm
    assert vllm["--max-num-batched-tokens"] == "512"  # the chunk, not max_batched_tokens
    assert "max_batched_tokens (8192) is not written" in (out / "vllm_serve.sh").read_text()
    sglang = sglang_call(out, tmp_path)
    assert sglang["--chunked-prefill-size"] == "512" and sglang["--enable-mixed-chunk"] is True
    assert approximations(model, cluster, deployment, "vllm") == []
    assert approximations(model, cluster, deployment, "sglang") == []


@needs_bash
def test_prefix_caching_becomes_the_engines_prefix_caches(tmp_path):
    model, cluster, deployment = specs("llama-2-13b", "4xl4", "vllm-tp4")
    deployment = deployment.model_copy(update={"prefix_caching": True})
    out = tmp_path / "out"
    emit_serving_configs(model, cluster, deployment, ENGINES, out)
    _, vllm = vllm_call(out, tmp_path)
    assert vllm["--enable-prefix-caching"] is True and "--no-enable-prefix-caching" not in vllm
    assert "--disable-radix-cache" not in sglang_call(out, tmp_path)


@needs_bash
def test_model_path_replaces_the_placeholder(tmp_path):
    model, cluster, deployment = specs("llama-2-13b", "4xl4", "vllm-tp4")
    out = tmp_path / "out"
    path = "/models/Llama 2 13B"  # a space survives quoting
    emit_serving_configs(model, cluster, deployment, ENGINES, out, model_path=path)
    assert vllm_call(out, tmp_path)[0] == path
    assert sglang_call(out, tmp_path)["--model-path"] == path


@needs_bash
def test_a_deployment_over_two_nodes_names_them(tmp_path):
    model, cluster = load_model("llama-2-70b"), load_cluster("2x8xa100-80gb")
    deployment = DeploymentSpec.parse({"prefill": {"tp": 8}, "dp": 2})
    out = tmp_path / "out"
    emit_serving_configs(model, cluster, deployment, ENGINES, out)
    _, vllm = vllm_call(out, tmp_path)
    assert vllm["--data-parallel-backend"] == "ray"
    assert "--distributed-executor-backend" not in vllm  # each replica fits one node
    sglang = sglang_call(out, tmp_path)
    assert (sglang["--nnodes"], sglang["--node-rank"]) == ("2", "0")
    assert sglang["--dist-init-addr"] == "localhost:29500"


# --- approximations -------------------------------------------------------------------------


@pytest.mark.parametrize("engine, name", [("vllm", "vLLM"), ("sglang", "SGLang")])
def test_approximations_name_resharding_and_only_then(engine, name):
    seesaw = specs(*CASES["seesaw"])
    notes = approximations(*seesaw, engine)
    assert any(f"{name} cannot re-shard" in a and "(tp4 pp1) is not used" in a for a in notes)
    assert any("Seesaw scheduler" in a for a in notes)
    assert any("cpu_kv_buffer_GB 80" in a for a in notes)
    script = render_serving(*seesaw, [engine])[0].text
    assert all(a.split(":")[0] in script for a in notes)  # listed in the header too
    assert approximations(*specs(*CASES["static-dp2"]), engine) == []


def test_swap_preemption_is_recorded():
    model, cluster = load_model("llama-2-13b"), load_cluster("4xl4")
    deployment = DeploymentSpec.parse({"prefill": {"tp": 4}, "preemption": "swap", "cpu_kv_buffer_GB": 16})
    vllm = render_serving(model, cluster, deployment, ["vllm"])[0]
    assert any("swap preemption is not selectable" in a for a in vllm.approximations)
    assert "    --swap-space 3.725\n" in vllm.text  # the 16 GB buffer over 4 GPUs, in GiB
    sglang = approximations(model, cluster, deployment, "sglang")
    assert any("SGLang has no swap preemption" in a for a in sglang)


def test_vllm_limits_are_recorded():
    model, cluster = load_model("llama-2-13b"), load_cluster("4xl4")
    deployment = DeploymentSpec.parse({"prefill": {"tp": 4}, "max_batched_tokens": 2048,
                                       "block_size": 24})
    vllm = render_serving(model, cluster, deployment, ["vllm"])[0]
    assert "    --max-model-len 2048\n" in vllm.text  # vLLM refuses a budget below the context
    assert "    --block-size 16\n" in vllm.text
    assert [a.split(":")[0] for a in vllm.approximations] == [
        "vLLM without chunked prefill needs --max-num-batched-tokens >= the context length",
        "vLLM offers KV blocks of 1, 8, 16, 32, 64, 128 tokens",
    ]
    assert approximations(model, cluster, deployment, "sglang") == []  # any page size


# --- errors ---------------------------------------------------------------------------------


def test_unknown_engine_raises_before_writing(tmp_path):
    model, cluster, deployment = specs(*CASES["static-dp2"])
    with pytest.raises(SpecError) as err:
        emit_serving_configs(model, cluster, deployment, ["vllm", "trtllm"], tmp_path / "out")
    assert (err.value.field, err.value.value) == ("emit", "trtllm")
    assert err.value.allowed == "allowed: vllm, sglang"
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("layout, field", [
    ({"prefill": {"tp": 3}}, "deployment.prefill.tp"),  # 40 heads: no even split for vLLM or SGLang
    ({"prefill": {"tp": 8}}, "deployment"),  # 8 GPUs on a 4-GPU cluster
])
def test_deployments_that_do_not_fit_raise_before_writing(tmp_path, layout, field):
    model, cluster = load_model("llama-2-13b"), load_cluster("4xl4")
    with pytest.raises(SpecError) as err:
        emit_serving_configs(model, cluster, DeploymentSpec.parse(layout), ENGINES, tmp_path / "out")
    assert err.value.field == field
    assert not (tmp_path / "out").exists()


@needs_bash
@pytest.mark.parametrize("speculation,config", [
    ({"draft": "ngram", "policy": "fixed", "k": 3, "acceptance": {"mean": 0.6}},
     {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 4, "prompt_lookup_min": 1}),
    ({"draft": "llama-68m", "policy": "fixed", "k": 5, "acceptance": {"mean": 0.6}},
     {"method": "draft_model", "model": "llama-68m", "draft_tensor_parallel_size": 1, "num_speculative_tokens": 5}),
])
def test_fixed_speculation_becomes_vllms_speculative_config(tmp_path, speculation, config):
    import json

    model, cluster = load_model("llama-2-7b"), load_cluster("1xa100-80gb")
    deployment = DeploymentSpec.parse({"speculation": speculation})
    out = tmp_path / "out"
    emit_serving_configs(model, cluster, deployment, ENGINES, out)
    _, vllm = vllm_call(out, tmp_path)
    assert json.loads(vllm["--speculative-config"]) == config
    assert approximations(model, cluster, deployment, "vllm") == []
    assert any("speculative decoding" in a for a in approximations(model, cluster, deployment, "sglang"))


def test_adaptive_speculation_is_written_as_k_at_batch_one_switched_off_where_k_is_zero(tmp_path):
    import json

    from simulator.speculation import ModelStepCost, policy_table

    model, cluster = load_model("llama-2-7b"), load_cluster("1xa100-80gb")
    deployment = DeploymentSpec.parse({"max_num_seqs": 1024, "speculation": {
        "draft": "llama-68m", "policy": "adaptive", "acceptance": {"mean": 0.2}}})
    table = policy_table(ModelStepCost.build(model, cluster, deployment.decode, deployment.speculation),
                         deployment.speculation.acceptance, [1, 2, 4, 8, 16, 32, 64, 128, 256])
    (launch,) = [f for f in render_serving(model, cluster, deployment, ["vllm"]) if f.path.name == "vllm_serve.sh"]
    line = next(w for w in launch.text.splitlines() if "--speculative-config" in w)
    config = json.loads(line.split("--speculative-config ", 1)[1].strip().strip("'"))
    assert config["num_speculative_tokens"] == table.rows[0].k > 0
    assert config["disable_by_batch_size"] == next(r.batch_size for r in table.rows if r.k == 0)
    assert any("one k for every batch size" in a for a in launch.approximations)
