"""`simtune profile` end to end on tiny sweeps, the measured costs the simulator derives from a
profile, and the prepared GPU script run on the CPU."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from profiler_stubs import cut_sweeps
from typer.testing import CliRunner

from profiler import gemm
from simtune.cli import app
from simulator.costs.timing import attention_s
from simulator.specs.catalog import load_cluster, load_model
from simulator.specs.profile import catalog_device_of
from simulator.training.stage_model import StageModel

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def tiny(monkeypatch):
    """Each family's sweep cut to its first shapes (the command path is unchanged)."""
    cut_sweeps(monkeypatch, 4)


def run(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_profile_writes_fits_in_the_json_contract_and_resumes(tmp_path, tiny):
    out = tmp_path / "p"
    first = run("profile", "--device", "cpu", "--ops", "gemm,memory", "--quick", "--out", out, "--json")
    assert first.exit_code == 0, first.stderr
    data = json.loads(first.stdout)
    for op in ("gemm", "memory"):
        assert set(data["fits"][op]) >= {"cv_median_abs_error", "samples"} and data["fits"][op]["samples"] == 4
    assert data["device"]["threads"] == 1 and data["datasheet_device"] == catalog_device_of(data["device"])   # this CPU
    rows = pd.read_csv(out / "gemm.csv")
    assert len(rows) == 4 and (rows["median_s"] > 0).all()
    again = run("profile", "--device", "cpu", "--ops", "gemm", "--quick", "--out", out)
    assert again.exit_code == 0 and "gemm: already measured, skipped" in again.stderr
    assert len(pd.read_csv(out / "gemm.csv")) == 4
    report = run("profile", "--report", out, "--plot", tmp_path / "eff.png")
    assert report.exit_code == 0 and (tmp_path / "eff.png").stat().st_size > 0
    assert "gemm" in report.stdout and "held-out" in report.stdout


@pytest.mark.parametrize("args, message", [
    (("--ops", "gemm,flops"), "ops = 'flops': unknown op family"),
    (("--device", "tpu"), "device = 'tpu': must be cpu, cuda"),
    (("--ranks", "1"), "ranks = 1: collectives need at least 2 ranks"),
    ((), "--out = None"),
])
def test_bad_profile_arguments_name_the_option(tmp_path, args, message):
    extra = () if args == () else ("--out", tmp_path / "x")
    result = run("profile", *args, *extra)
    assert result.exit_code == 2 and message in result.stderr, result.stderr


def test_report_of_a_missing_profile_names_the_file(tmp_path):
    result = run("profile", "--report", tmp_path)
    assert result.exit_code == 2 and "profile.json: file" in result.stderr


def test_the_committed_profile_sets_every_cost_it_measured():
    dev = load_cluster("1xcpu").device
    e = dev.efficiency
    assert {k for k, v in dev.sources().items() if v != "datasheet"} >= {"gemm", "attention", "memory",
                                                                          "collectives", "step_overhead"}
    assert e.weight_stream is not None and e.kv_read is not None and e.attention_half_seq > 0
    assert 0 < e.gemm_max <= 1 and e.step_overhead_us > 0


def test_attention_efficiency_saturates_with_sequence_length():
    """Without a measured curve, the saturating form; the committed CPU profile has a curve,
    which steps where PyTorch's CPU flash kernel changes its query block (768 queries)."""
    measured = load_cluster("1xcpu").device
    assert measured.efficiency.attention_curve and 768 in measured.efficiency.attention_steps
    assert attention_s(measured, 1e9, seq=768) < attention_s(measured, 1e9, seq=767)
    dev = measured.model_copy(update={"efficiency": measured.efficiency.model_copy(update={"attention_curve": None})})
    h = dev.efficiency.attention_half_seq
    assert attention_s(dev, 1e9, seq=h) == pytest.approx(2 * attention_s(dev, 1e9))
    assert attention_s(dev, 1e9, seq=100 * h) == pytest.approx(attention_s(dev, 1e9), rel=0.02)


def test_flash_backward_recomputes_the_scores():
    stage = StageModel(load_model("gpt3-125m"), load_cluster("1xcpu"), tp=1, dp=1, micro_batch_size=1, seq_length=512)
    flash = stage.evaluate({"flash": 1.0}, 1.0, first=False, last=False)
    core = stage.layer_forward(stage.costs({"flash": 1.0}, 1.0), {"f8": 0.0, "eg": 0.0})["attention_core"]
    assert float(flash["bwd_compute"]) == pytest.approx(2 * float(flash["fwd_compute"]) + 0.5 * float(core))


def test_gemm_stream_fit_recovers_bandwidth_and_call_cost():
    rng = np.random.default_rng(0)
    rows = []
    for m in (1, 4, 16, 32):
        for n, k in ((1536, 576), (576, 1536), (49152, 576), (3072, 768)):
            weight = n * k * 2
            t = weight / 8e9 + 50e-6
            rows.append({"m": m, "n": n, "k": k, "dtype": "bf16", **gemm.values({"m": m, "n": n, "k": k, "dtype": "bf16"}),
                         "median_s": t * (1 + rng.normal(0, 0.01))})
    for m in (64, 128, 512):
        for n, k in ((1536, 576), (3072, 768), (768, 3072)):
            flops = 2 * m * n * k
            rows.append({"m": m, "n": n, "k": k, "dtype": "bf16", "flops": flops, "bytes": 0,
                         "median_s": flops * (1 + 8 / min(m, n, k)) / 3e11 * (1 + rng.normal(0, 0.01))})
    fit = gemm.fit(pd.DataFrame(rows), {"kind": "cpu"})["bf16"]
    assert fit["stream"]["bytes_per_s"] == pytest.approx(8e9, rel=0.05)
    assert fit["stream"]["overhead_s"] == pytest.approx(50e-6, rel=0.1)
    assert fit["flops_per_s"] == pytest.approx(3e11, rel=0.05)


@pytest.mark.slow
def test_the_gpu_script_runs_on_the_cpu(tmp_path):
    """profiler/gpu_quick.sh end to end with DEVICE=cpu on the cheapest family."""
    out = tmp_path / "gpu"
    env = {**os.environ, "DEVICE": "cpu", "OPS": "copies", "PY": str(ROOT / ".venv/bin/python")}
    if not Path(env["PY"]).exists():
        env["PY"] = "python3"
    done = subprocess.run(["bash", str(ROOT / "profiler/gpu_quick.sh"), str(out)], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads((out / "report.json").read_text())["fits"]["copies"]["samples"] > 0
    assert (out / "efficiency.png").stat().st_size > 0
    assert json.loads((out / "validate_train.json").read_text())["summary"]
