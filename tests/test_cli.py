"""The command line: JSON contracts on stdout, human tables, errors as exit code 2."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from simtune.cli import app, fmt_seconds, to_jsonable
from simulator.specs.catalog import load_plan
from simulator.training.report import BREAKDOWN_KEYS

DEBUG = ["--model", "gpt-debug", "--cluster", "2xa100-80gb", "--plan", "debug"]


@pytest.fixture
def cli():
    runner = CliRunner()
    return lambda *args: runner.invoke(app, list(args))


def one_json_object(result) -> dict:
    """The whole of stdout is exactly one JSON object."""
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert isinstance(data, dict)
    return data


# --- catalog ---------------------------------------------------------------------------------


def test_catalog_json_lists_names_with_key_fields(cli):
    data = one_json_object(cli("catalog", "--json"))
    assert set(data) == {"devices", "clusters", "models", "plans", "deployments", "workloads", "engines",
                         "graphs", "gnn_models", "gnn_plans"}
    graphs = {row["name"]: row for row in data["graphs"]}
    assert graphs["ogbn-products"]["num_nodes"] == 2_449_029  # OGB's published count
    assert {row["name"] for row in data["gnn_models"]} >= {"graphsage-3", "gcn-3", "gat-3"}
    models = {row["name"]: row for row in data["models"]}
    assert models["gpt3-175b"]["num_layers"] == 96
    assert models["gpt3-175b"]["hidden_size"] == 12288
    clusters = {row["name"]: row for row in data["clusters"]}
    assert clusters["8xa100-80gb"]["devices_per_node"] == 8
    assert {row["name"] for row in data["devices"]} >= {"a100-80gb", "h100-sxm"}
    assert "debug" in {row["name"] for row in data["plans"]}


def test_catalog_one_kind_as_tables(cli):
    result = cli("catalog", "--kind", "clusters")
    assert result.exit_code == 0, result.stderr
    assert "8xa100-80gb" in result.stdout
    assert "16x8xa100-80gb" in result.stdout  # the multi-node form is explained
    assert "gpt3-175b" not in result.stdout


# --- simulate train --------------------------------------------------------------------------


def test_simulate_train_json_is_the_report(cli):
    data = one_json_object(cli("simulate", "train", *DEBUG, "--json"))
    assert data["iteration_time_s"] > 0
    assert data["tokens_per_s"] > 0
    assert 0 < data["mfu"] <= 1
    assert data["feasible"] is True
    assert set(data["breakdown"]) == set(BREAKDOWN_KEYS)
    assert math.isclose(sum(data["breakdown"].values()), data["iteration_time_s"], rel_tol=1e-6)
    assert [s["layers"] for s in data["stages"]] == [2, 2]
    assert all(s["memory_bytes"] > 0 for s in data["stages"])


def test_simulate_train_human_summary(cli):
    result = cli("simulate", "train", *DEBUG)
    assert result.exit_code == 0, result.stderr
    for text in ("gpt-debug on 2xa100-80gb", "MFU", "iteration time", "pipeline_bubble",
                 "per stage"):
        assert text in result.stdout


def test_simulate_train_writes_a_chrome_trace(cli, tmp_path):
    trace = tmp_path / "trace.json"
    result = cli("simulate", "train", *DEBUG, "--json", "--trace", str(trace))
    one_json_object(result)  # the note about the trace goes to stderr, not stdout
    assert "trace.json" in result.stderr and "perfetto" in result.stderr
    assert json.loads(trace.read_text())["traceEvents"]


def test_simulate_train_reads_a_yaml_plan(cli, tmp_path):
    plan = tmp_path / "my-plan.yaml"
    plan.write_text("tp: 2\npp: 1\ndp: 1\nmicro_batch_size: 1\nglobal_batch_size: 4\n")
    data = one_json_object(cli("simulate", "train", *DEBUG[:4], "--plan", str(plan), "--json"))
    assert data["plan"]["tp"] == 2 and data["plan"]["global_batch_size"] == 4
    assert [s["layers"] for s in data["stages"]] == [4]


def test_infeasible_memory_is_reported_not_an_error(cli):
    result = cli("simulate", "train", "-m", "gpt3-175b", "-c", "2xa100-80gb", "-p", "debug")
    assert result.exit_code == 0, result.stderr
    assert "infeasible" in result.stdout


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--model", "nope-model", *DEBUG[2:]], "nope-model"),
        ([*DEBUG[:4], "--plan", "missing-plan.yaml"], "missing-plan.yaml"),
        (["--model", "gpt-debug", "--cluster", "8xa100-80gb", "--plan", "debug"], "8 devices"),
    ],
)
def test_input_errors_exit_2_with_a_message_on_stderr(cli, args, expected):
    result = cli("simulate", "train", *args, "--json")
    assert result.exit_code == 2
    assert result.stdout == ""
    assert result.stderr.startswith("error: ")
    assert expected in result.stderr
    assert "Traceback" not in result.stderr


# --- validate train --------------------------------------------------------------------------


def fake_validation(passed: bool):
    rows = [
        {"id": "a", "source": "Paper A", "group": "time", "quantity": "iteration time",
         "unit": "s", "predicted": 1.05, "measured": 1.0, "error": 0.05},
        {"id": "b", "source": "Paper B", "group": "memory", "quantity": "activations",
         "unit": "GiB", "predicted": np.float32(9.0), "measured": 10.0, "error": -0.1},
    ]
    summary = {
        "time": {"mae": 0.05, "max": 0.05, "target": 0.10, "passed": True, "n": 1},
        "memory": {"mae": 0.1, "max": 0.1, "target": 0.15, "passed": passed, "n": 1},
    }
    result = SimpleNamespace(rows=rows, summary=summary)
    result.to_dict = lambda: {"rows": rows, "summary": summary}
    return lambda **options: result


def test_validate_train_json(cli, monkeypatch):
    monkeypatch.setattr("simulator.training.validation.validate_training", fake_validation(True))
    data = one_json_object(cli("validate", "train", "--json"))
    assert data["summary"]["time"]["passed"] is True
    assert data["rows"][1]["predicted"] == 9.0  # numpy scalars serialize


def test_validate_train_tables_and_strict_exit_code(cli, monkeypatch):
    monkeypatch.setattr("simulator.training.validation.validate_training", fake_validation(False))
    result = cli("validate", "train")
    assert result.exit_code == 0
    for text in ("+5.0%", "-10.0%", "PASS", "FAIL", "Paper A"):
        assert text in result.stdout
    assert cli("validate", "train", "--strict").exit_code == 1
    assert cli("validate", "train", "--strict", "--json").exit_code == 1


def test_validate_train_prints_row_notes_and_groups_without_a_target(cli, monkeypatch):
    result = fake_validation(True)()
    result.rows.append({"id": "c", "source": "Paper C", "group": "reported", "quantity": "iteration time",
                        "unit": "s", "predicted": 2.0, "measured": 1.0, "error": 1.0,
                        "note": "measured compiled; predicted eager"})
    result.summary["reported"] = {"mae": 1.0, "max": 1.0, "target": None, "passed": None, "n": 1}
    monkeypatch.setattr("simulator.training.validation.validate_training", lambda **options: result)
    shown = cli("validate", "train", "--strict")
    assert shown.exit_code == 0  # a group without a target never fails
    assert "c: measured compiled; predicted eager" in shown.stdout
    assert "+100.0%" in shown.stdout
    data = one_json_object(cli("validate", "train", "--json"))
    assert data["rows"][2]["note"] == "measured compiled; predicted eager"
    assert data["summary"]["reported"]["passed"] is None


# --- helpers ---------------------------------------------------------------------------------


def test_to_jsonable_gives_strict_json():
    data = to_jsonable({"a": np.float32(1.5), "b": [np.int64(2), float("nan")], "c": np.ones(2)})
    assert json.dumps(data, allow_nan=False) == '{"a": 1.5, "b": [2, null], "c": [1.0, 1.0]}'


def test_fmt_seconds_picks_a_unit():
    assert fmt_seconds(51.2364) == "51.236 s"
    assert fmt_seconds(0.0016399) == "1.640 ms"
    assert fmt_seconds(2.4e-5) == "24.0 µs"


# --- tune train ------------------------------------------------------------------------------

TUNE_DEBUG = ["--model", "gpt-debug", "--cluster", "2xa100-80gb", "--global-batch-size", "8"]


@pytest.fixture(scope="module")
def tuned_json() -> dict:
    """`tune train --json` in its own process: native solver output must not reach stdout."""
    cmd = [sys.executable, "-m", "simtune.cli", "tune", "train", *TUNE_DEBUG, "--json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)  # the whole of stdout is one JSON object


def test_tune_train_json_is_the_tuner_contract(tuned_json):
    data = tuned_json
    assert {"plan", "report", "baselines", "search"} <= set(data)
    assert {"evaluated", "feasible", "infeasible", "seconds", "evaluations_per_s"} <= set(data["search"])
    assert data["search"]["evaluations_per_s"] > 0
    assert data["search"]["evaluated"] == data["search"]["feasible"] + data["search"]["infeasible"]
    assert data["report"]["feasible"] is True
    assert set(data["baselines"]) == {"megatron", "aceso"}
    for baseline in data["baselines"].values():
        assert {"plan", "report"} <= set(baseline)
        assert data["report"]["iteration_time_s"] <= baseline["report"]["iteration_time_s"] * (1 + 1e-9)


def test_tuned_plan_is_accepted_by_simulate_train(cli, tuned_json, tmp_path):
    path = tmp_path / "tuned.yaml"
    path.write_text(yaml.safe_dump(tuned_json["plan"], sort_keys=False))
    assert load_plan(str(path)).to_dict() == tuned_json["plan"]
    report = one_json_object(cli("simulate", "train", *TUNE_DEBUG[:4], "--plan", str(path), "--json"))
    assert math.isclose(report["iteration_time_s"], tuned_json["report"]["iteration_time_s"],
                        rel_tol=1e-9)


def test_tune_train_human_output_and_a_baseline_without_plan(cli, monkeypatch):
    import tuner.training

    real = tuner.training.tune_training

    def no_aceso(*args, **kwargs):
        result = real(*args, **{**kwargs, "baselines": ("megatron",)})
        result.baselines["aceso"] = None  # as when a baseline finds nothing that fits
        return result

    monkeypatch.setattr(tuner.training, "tune_training", no_aceso)
    result = cli("tune", "train", *TUNE_DEBUG)
    assert result.exit_code == 0, result.stderr
    for text in ("tuned plan", "checkpointed", "offload w/g/o/a", "iteration time (discrete-event)",
                 "iteration time (closed form)", "MFU", "vs baselines", "speedup", "megatron",
                 "no plan fits", "evaluations/s"):
        assert text in result.stdout
    assert "baseline aceso found no plan" in result.stderr
    data = one_json_object(cli("tune", "train", *TUNE_DEBUG, "--json"))
    assert data["baselines"]["aceso"] is None and data["baselines"]["megatron"]["plan"]


def test_tune_train_emits_launch_files_and_the_plan(cli, tmp_path):
    out_dir = tmp_path / "launch"
    result = cli("tune", "train", *TUNE_DEBUG, "--no-baselines", "--emit", "megatron,deepspeed",
                 "--out", str(out_dir), "--json")
    data = one_json_object(result)
    assert data["baselines"] == {}
    written = {p.name for p in out_dir.iterdir()}
    assert {"megatron_args.sh", "deepspeed_config.json", "plan.yaml"} <= written
    assert "torchrun.sh" not in written
    assert load_plan(str(out_dir / "plan.yaml")).to_dict() == data["plan"]
    assert str(out_dir / "plan.yaml") in result.stderr


def test_tune_train_nothing_fits_exits_2(cli):
    result = cli("tune", "train", "--model", "llama-3.1-405b", "--cluster", "1xa100-80gb",
                 "--global-batch-size", "1", "--no-baselines", "--json")
    assert result.exit_code == 2
    assert result.stdout == ""
    assert result.stderr.startswith("error: ") and "nothing fits" in result.stderr


def test_tune_train_unknown_engine_exits_2_before_searching(cli, tmp_path):
    result = cli("tune", "train", *TUNE_DEBUG, "--emit", "megatron,nemo", "--out", str(tmp_path / "x"))
    assert result.exit_code == 2
    assert "nemo" in result.stderr and "torchtitan" in result.stderr
    assert not (tmp_path / "x").exists()


def test_tune_train_refuses_torchtitan_for_a_gpt_before_searching(cli, tmp_path):
    result = cli("tune", "train", *TUNE_DEBUG, "--emit", "megatron,torchtitan", "--out", str(tmp_path / "x"))
    assert result.exit_code == 2 and result.stdout == ""
    assert "emit = 'torchtitan'" in result.stderr and "LayerNorm" in result.stderr
    assert not (tmp_path / "x").exists()
