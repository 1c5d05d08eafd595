"""The training executor: real gloo ranks (through `run_ranks`) train tiny models as the plan says.

Every data-parallel flavour must compute the losses one process computes on the whole batch
(fp32, same seed, same synthetic batches, plain AdamW): an unsynchronised or double-counted
gradient shows in the second step's loss. The checkpointed layers are counted on the modules
the ranks built, not taken from the plan. The dry run and the refusals need no ranks.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
import yaml
from torch.utils._python_dispatch import TorchDispatchMode
from typer.testing import CliRunner

from executor.training.checkpointing import apply_activation_checkpointing, recompute_kinds
from executor.training.degrees import ParallelDegrees
from executor.training.model import Decoder
from executor.training.parallelize import check_runnable, parallel_extension
from executor.training.pipeline import init_weights
from executor.training.rank import FAIL_RANK_ENV, LEARNING_RATE, loss_of, synthetic_batch
from executor.training.run import run_spec, run_training
from profiler.ranks import RankError
from simtune.cli import app
from simulator.errors import SpecError
from simulator.specs.catalog import load_cluster, load_model
from simulator.specs.plan import TrainingPlan

STEPS, WARMUP = 2, 1  # three losses per run
GPT = load_model("gpt-debug").model_copy(update={"dropout": False})  # dropout masks differ per rank
LLAMA = load_model("llama-debug")


# CPU ranks have no separate host memory, so validate_plan refuses offloading on 2xcpu; this
# copy claims one so that the offload paths (FSDP2's CPUOffloadPolicy, the host optimizer)
# run and are checked for exactness, as they would on GPUs.
OFFLOADING_2XCPU = load_cluster("2xcpu").model_copy(update={"name": "2xcpu-offload-path", "host_offload": True})


def plan(**fields) -> dict:
    return {"micro_batch_size": 2, "global_batch_size": 8, **fields}


def reference_losses(spec, plan_fields: dict, steps: int = STEPS + WARMUP, seed: int = 0) -> list[float]:
    """One process, the whole global batch in one forward, plain AdamW, fp32, the runner's
    per-name weight draw."""
    p = TrainingPlan(**plan_fields)
    spec = run_spec(spec, p)
    model = Decoder(spec)
    init_weights(model, seed, spec.tied_embeddings)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE)
    losses = []
    for step in range(steps):
        batch = synthetic_batch(spec, p.global_batch_size, step, seed)
        loss = loss_of(model(batch[:, :-1]), batch[:, 1:])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


# --- data parallel and ZeRO: losses of 2 and 4 gloo ranks == one process --------------------

CASES = {
    "ddp": (GPT, "2xcpu", plan(dp=2, zero_stage=0)),
    "zero1": (LLAMA, "2xcpu", plan(dp=2, zero_stage=1)),
    "zero2": (GPT, "2xcpu", plan(dp=2, zero_stage=2)),
    "zero3 + checkpointing": (LLAMA, "2xcpu", plan(dp=2, zero_stage=3, recompute="full", checkpointed_layers=3)),
    "zero3 + cpu offload": (GPT, OFFLOADING_2XCPU, plan(dp=2, zero_stage=3, offload={"weights": 1, "gradients": 1, "optimizer": 1})),
    "ddp + optimizer offload + selective": (LLAMA, OFFLOADING_2XCPU, plan(dp=2, offload={"optimizer": 1}, recompute="selective")),
    "hsdp 2 x 2": (LLAMA, "2x2xcpu", plan(dp=4, dp_shard=2, zero_stage=3)),
}


@pytest.mark.parametrize("case", CASES)
def test_data_parallel_losses_match_one_process(case):
    spec, cluster, fields = CASES[case]
    report = run_training(spec, cluster, fields, steps=STEPS, warmup=WARMUP, dtype="fp32", timeout_s=120)
    assert report.losses == pytest.approx(reference_losses(spec, fields), rel=2e-5)
    assert len(report.peak_memory_bytes) == report.degrees["world_size"] == TrainingPlan(**fields).num_devices
    assert all(b > 0 for b in report.peak_memory_bytes)
    assert report.step_time_s > 0 and report.tokens_per_s == pytest.approx(8 * 32 / report.step_time_s)
    p = TrainingPlan(**fields)
    assert report.checkpointed_layers == p.stage_checkpointed(spec)
    assert report.parameters == sum(x.numel() for x in Decoder(spec).parameters())


# --- with tensor and pipeline parallel (executor/training/tensor_parallel.py, pipeline.py) ------


def test_pipeline_and_data_parallel_losses_match_one_process():
    fields = plan(pp=2, dp=2, zero_stage=1, recompute="full",
                  stages=[{"layers": 3, "checkpointed_layers": 1}, {"layers": 1, "checkpointed_layers": 0}])
    report = run_training(GPT, "2x2xcpu", fields, steps=STEPS, warmup=WARMUP, dtype="fp32", timeout_s=120)
    assert report.losses == pytest.approx(reference_losses(GPT, fields), rel=2e-5)
    assert report.checkpointed_layers == [1, 0]
    assert report.parameters == run_training(GPT, "2x2xcpu", fields, dry_run=True).predicted_parameters


def test_tensor_and_data_parallel_losses_match_one_process():
    fields = plan(tp=2, dp=2, zero_stage=3, sequence_parallel=True)
    report = run_training(LLAMA, "2x2xcpu", fields, steps=STEPS, warmup=WARMUP, dtype="fp32", timeout_s=120)
    assert report.losses == pytest.approx(reference_losses(LLAMA, fields), rel=2e-5)


# --- activation checkpointing: which blocks, and the gradients stay exact ----------------------


class AttentionCalls(TorchDispatchMode):
    """Counts the attention core's forward runs (first pass and recomputes)."""

    def __init__(self):
        super().__init__()
        self.forwards = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        self.forwards += "scaled_dot_product" in name and "backward" not in name
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("recompute", ["none", "full", "selective", "selective_op"])
def test_checkpointing_wraps_the_planned_blocks_and_keeps_gradients(recompute):
    torch.manual_seed(0)
    reference = Decoder(LLAMA)
    model = Decoder(LLAMA)
    model.load_state_dict(reference.state_dict())
    apply_activation_checkpointing(model.blocks, 1, recompute)
    rest = recompute if recompute.startswith("selective") else "none"
    assert recompute_kinds(model) == ["full", rest, rest, rest]
    batch = synthetic_batch(LLAMA, 2, 0, 0)
    loss_of(reference(batch[:, :-1]), batch[:, 1:]).backward()
    with AttentionCalls() as calls:
        loss_of(model(batch[:, :-1]), batch[:, 1:]).backward()
    # four first passes; the checkpointed block runs again, and with `selective` the other three
    # (selective_op keeps the attention output: only the whole-block recompute runs it again)
    assert calls.forwards == 4 + (4 if recompute == "selective" else 1)
    for (name, p), q in zip(reference.named_parameters(), model.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-6), name


def test_checkpointed_layers_per_stage_follow_the_plan():
    fields = plan(pp=2, recompute="full", stages=[{"layers": 3, "checkpointed_layers": 2},
                                                   {"layers": 1, "checkpointed_layers": 0}])
    assert run_training(GPT, "2xcpu", fields, dry_run=True).checkpointed_layers == [2, 0]
    interleaved = plan(pp=2, schedule="interleaved", virtual_stages=2, global_batch_size=4, micro_batch_size=1,
                       recompute="full", checkpointed_layers=1)
    assert run_training("llama-debug", "2xcpu", interleaved, dry_run=True).checkpointed_layers == [1, 1]


# --- dry run: meta stages, the simulator's parameter count and memory --------------------------


@pytest.mark.parametrize("spec, cluster, fields", [
    (GPT, "2xcpu", plan(dp=2)),
    (load_model("gpt-debug"), "2xcpu", plan(pp=2)),  # tied embedding: a copy on the last stage
    (LLAMA, "2x2xcpu", plan(tp=2, pp=2, sequence_parallel=True)),
    (load_model("gpt3-125m"), "2x2xcpu", plan(pp=4, global_batch_size=16, micro_batch_size=1)),
])
def test_dry_run_counts_the_simulators_parameters(spec, cluster, fields):
    r = run_training(spec, cluster, fields, dry_run=True)
    assert r.parameters == r.predicted_parameters > 0
    assert r.predicted_peak_memory_bytes > 0 and r.step_time_s is None and r.backend is None
    assert r.to_dict()["dry_run"] is True


# --- refusals: named fields, nothing started ------------------------------------------------


@pytest.mark.parametrize("fields, field", [
    (plan(dp=2, zero_stage=3, offload={"weights": 0.5, "gradients": 1, "optimizer": 1}), "plan.offload.weights"),
    (plan(dp=2, offload={"activations": 0.25}), "plan.offload.activations"),
    (plan(dp=2, zero_stage=0, offload={"weights": 1, "gradients": 1, "optimizer": 1}), "plan.offload.weights"),
    (plan(dp=2, zero_stage=3, offload={"gradients": 1}), "plan.offload.gradients"),
    (plan(dp=2, precision="fp8"), "plan.precision"),
    (plan(dp=4), "plan"),  # 4 ranks on 2 devices
])
def test_plans_the_runner_cannot_express_are_refused_by_field(fields, field):
    with pytest.raises(SpecError) as e:
        run_training(GPT, OFFLOADING_2XCPU, fields)
    assert e.value.field == field


def test_missing_tensor_or_pipeline_module_is_a_named_error(monkeypatch):
    import importlib

    real = importlib.import_module

    def without_pipeline(name, *args):
        if name == "executor.training.pipeline":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return real(name, *args)

    monkeypatch.setattr(importlib, "import_module", without_pipeline)
    with pytest.raises(SpecError, match="pipeline.py") as e:
        parallel_extension("pipeline", 2)
    assert e.value.field == "plan.pp"


def test_degrees_lay_ranks_out_as_init_device_mesh_does():
    d = ParallelDegrees(tp=2, pp=2, dp=4, dp_shard=2, replicas=2, world_size=16)
    names, sizes = zip(*d.mesh_shape)
    assert names == ("pp", "dp_replicate", "dp_shard", "tp")
    grid = torch.arange(16).view(sizes)
    for rank in range(16):
        pp, rep, shard, tp = (int(i) for i in (grid == rank).nonzero()[0])
        c = d.coords(rank)
        assert (c.pp, c.dp, c.tp) == (pp, rep * 2 + shard, tp)
    assert ParallelDegrees.of(TrainingPlan(**plan(dp=2)), load_cluster("2xcpu")).mesh_shape == (("dp_shard", 2),)
    with pytest.raises(SpecError, match="dp_shard"):
        ParallelDegrees(tp=1, pp=1, dp=4, dp_shard=3, replicas=1, world_size=4)
    with pytest.raises(SpecError, match="zero_stage"):  # HSDP with a ZeRO-0 stage
        check_runnable(TrainingPlan(**plan(dp=4, dp_shard=2, zero_stage=3, stages=[{"layers": 4, "zero_stage": 0}])),
                       ParallelDegrees(tp=1, pp=1, dp=4, dp_shard=2, replicas=2, world_size=4))


# --- a failing rank ends the run, and nothing is left running -----------------------------------


def _children() -> set[int]:
    """Live child processes of this one, except multiprocessing's resource tracker (one per
    parent process for its lifetime, started by the first spawn; not a rank)."""
    me, kids = os.getpid(), set()
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if int(fields[1]) == me and fields[0] != "Z" and b"resource_tracker" not in cmdline:
            kids.add(int(proc.name))
    return kids


def test_a_failing_rank_ends_the_run_and_leaves_no_process(monkeypatch):
    before = _children()
    monkeypatch.setenv(FAIL_RANK_ENV, "1")
    with pytest.raises(RankError) as e:
        run_training(GPT, "2xcpu", plan(dp=2), steps=2, warmup=1, dtype="fp32", timeout_s=60)
    assert e.value.rank == 1 and "fails on purpose" in str(e.value)
    assert _children() <= before


# --- the tuner's plan runs unchanged, through the command line ----------------------------------


def test_tuned_plan_runs_unchanged_and_json_has_the_contract(tmp_path):
    runner = CliRunner()
    tuned = runner.invoke(app, ["tune", "train", "--model", "gpt-debug", "--cluster", "2xcpu", "-b", "8",
                                "--no-baselines", "--emit", "torchrun", "--out", str(tmp_path), "--json"])
    assert tuned.exit_code == 0, tuned.stderr
    plan_file = tmp_path / "plan.yaml"
    tuned_plan = yaml.safe_load(plan_file.read_text())
    assert tuned_plan["tp"] * tuned_plan["pp"] * tuned_plan["dp"] == 2
    result = runner.invoke(app, ["run", "train", "--model", "gpt-debug", "--cluster", "2xcpu", "--plan",
                                 str(plan_file), "--steps", "2", "--warmup", "1", "--compare", "--json"])
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert {"step_time_s", "tokens_per_s", "peak_memory_bytes", "losses", "predicted_step_time_s", "error"} <= set(data)
    assert len(data["peak_memory_bytes"]) == 2 and len(data["losses"]) == 3
    assert all(math.isfinite(x) for x in data["losses"])
    assert data["error"] == pytest.approx(data["step_time_s"] / data["predicted_step_time_s"] - 1)
    assert data["cost_sources"]  # the profile the prediction used


def test_cli_refuses_a_fractional_offload_with_exit_2(tmp_path):
    plan_file = tmp_path / "plan.yaml"
    plan_file.write_text(yaml.safe_dump(plan(dp=2, offload={"optimizer": 0.5})))
    cluster_file = tmp_path / "cluster.yaml"
    cluster_file.write_text(yaml.safe_dump(OFFLOADING_2XCPU.model_dump(mode="json")))
    result = CliRunner().invoke(app, ["run", "train", "--model", "gpt-debug", "--cluster", str(cluster_file),
                                      "--plan", str(plan_file)])
    assert result.exit_code == 2
    assert "plan.offload.optimizer = 0.5" in result.stderr
