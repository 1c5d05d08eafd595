"""The serving commands: `simulate serve`, `validate serve`, and serving specs in `catalog`."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from simtune.cli import app

PERCENTILES = {"p50", "p90", "p99"}
CONTRACT = {"output_tokens_per_s", "total_tokens_per_s", "requests_per_s", "ttft_s", "tpot_s",
            "makespan_s"}


@pytest.fixture
def cli():
    runner = CliRunner()
    return lambda *args: runner.invoke(app, [str(a) for a in args])


def one_json_object(result) -> dict:
    """The whole of stdout is exactly one JSON object."""
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert isinstance(data, dict)
    return data


def write_yaml(path, data: dict):
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture
def small_workload(tmp_path):
    """20 requests of 64 input and 32 output tokens, all at time 0."""
    return write_yaml(tmp_path / "small.yaml", {
        "num_requests": 20, "arrival": {"kind": "offline"},
        "input_tokens": {"distribution": "fixed", "value": 64},
        "output_tokens": {"distribution": "fixed", "value": 32},
    })


def small_run(workload) -> list[str]:
    return ["--model", "llama-2-7b", "--cluster", "1xa100-80gb", "--deployment", "vllm-tp1",
            "--workload", workload]


# --- simulate serve --------------------------------------------------------------------------


def test_simulate_serve_json_has_the_contract_keys(cli, small_workload):
    data = one_json_object(cli("simulate", "serve", *small_run(small_workload), "--json"))
    assert CONTRACT <= set(data)
    for key in ("ttft_s", "tpot_s"):
        assert PERCENTILES <= set(data[key])
        assert 0 < data[key]["p50"] <= data[key]["p90"] <= data[key]["p99"]
    assert data["num_requests"] == 20
    assert data["total_tokens_per_s"] == pytest.approx(data["output_tokens_per_s"] * 3)
    assert data["requests_per_s"] == pytest.approx(20 / data["makespan_s"])
    assert data["deployment"]["scheduler"] == "vllm"


def test_simulate_serve_human_output(cli, small_workload):
    result = cli("simulate", "serve", *small_run(small_workload))
    assert result.exit_code == 0, result.stderr
    for text in ("llama-2-7b", "1xa100-80gb", "vllm-tp1", "20 requests", "TTFT", "TPOT",
                 "output tokens/s", "KV utilization", "prefill"):
        assert text in result.stdout


def test_simulate_serve_writes_a_chrome_trace(cli, small_workload, tmp_path):
    trace = tmp_path / "serve.json"
    result = cli("simulate", "serve", *small_run(small_workload), "--json", "--trace", trace)
    one_json_object(result)  # the note about the trace goes to stderr
    assert str(trace) in result.stderr
    assert json.loads(trace.read_text())["traceEvents"]


def test_resharding_deployment_reports_transitions(cli, tmp_path):
    workload = write_yaml(tmp_path / "chat.yaml", {"num_requests": 30, "preset": "sharegpt-like"})
    args = ["--model", "llama-2-13b", "--cluster", "4xl4", "--deployment", "seesaw-pp4-tp4",
            "--workload", workload]
    data = one_json_object(cli("simulate", "serve", *args, "--json"))
    assert data["transitions"] > 0
    assert data["transition_time_s"] > 0
    assert "re-sharding" in cli("simulate", "serve", *args).stdout


def test_prefix_caching_is_reported(cli, tmp_path):
    workload = write_yaml(tmp_path / "system-prompt.yaml", {
        "num_requests": 20, "arrival": {"kind": "offline"}, "shared_prefix": {"tokens": 256, "groups": 2},
        "input_tokens": {"distribution": "fixed", "value": 32}, "output_tokens": {"distribution": "fixed", "value": 8}})
    deployment = write_yaml(tmp_path / "cached.yaml", {"prefix_caching": True, "max_batched_tokens": 512})
    args = ["--model", "llama-2-7b", "--cluster", "1xa100-80gb", "--deployment", deployment, "--workload", workload]
    data = one_json_object(cli("simulate", "serve", *args, "--json"))
    assert data["prefix_cache"]["prompt_tokens"] == 20 * (256 + 32)
    assert 0 < data["prefix_cache"]["cached_prompt_tokens"] <= 18 * 256
    assert "prompt tokens from the prefix cache" in cli("simulate", "serve", *args).stdout


def test_bad_deployment_exits_2_naming_the_field(cli, small_workload, tmp_path):
    deployment = write_yaml(tmp_path / "tp64.yaml", {"prefill": {"tp": 64}, "scheduler": "vllm"})
    args = small_run(small_workload)
    args[args.index("vllm-tp1")] = str(deployment)
    result = cli("simulate", "serve", *args, "--json")
    assert result.exit_code == 2
    assert "deployment.prefill.tp" in result.stderr
    assert result.stdout == ""


# --- catalog ---------------------------------------------------------------------------------


def test_catalog_lists_deployments_and_workloads(cli):
    result = cli("catalog", "--kind", "deployments")
    assert result.exit_code == 0, result.stderr
    assert "vllm-tp4" in result.stdout and "seesaw-pp4-tp4" in result.stdout
    data = one_json_object(cli("catalog", "--kind", "deployments", "--json"))
    rows = {row["name"]: row for row in data["deployments"]}
    assert rows["seesaw-pp4-tp4"]["prefill"] == {"tp": 1, "pp": 4}
    assert rows["seesaw-pp4-tp4"]["decode"] == {"tp": 4, "pp": 1}
    workloads = one_json_object(cli("catalog", "--kind", "workloads", "--json"))["workloads"]
    assert {"sharegpt-like", "fixed-128-128"} <= {row["name"] for row in workloads}


# --- validate serve --------------------------------------------------------------------------


def fake_serving_validation(passed: bool):
    rows = [
        {"id": "t", "source": "Docs T", "group": "throughput", "quantity": "output tokens/s",
         "unit": "tok/s", "predicted": np.float64(950.0), "measured": 1000.0, "error": -0.05},
        {"id": "m", "source": "Paper M", "group": "median latency", "quantity": "TTFT p50",
         "unit": "ms", "predicted": 120.0, "measured": 100.0, "error": 0.2},
        {"id": "p", "source": "Paper M", "group": "tail latency", "quantity": "TTFT p90",
         "unit": "ms", "predicted": 150.0, "measured": 300.0, "error": -0.5},
    ]
    summary = {
        "throughput": {"median_abs_error": 0.05, "max": 0.05, "target": 0.15, "passed": True,
                       "n": 1},
        "median latency": {"median_abs_error": 0.2, "max": 0.2, "target": 0.15,
                           "passed": passed, "n": 1},
        "tail latency": {"median_abs_error": 0.5, "max": 0.5, "target": None, "passed": None,
                         "n": 1},
    }
    result = SimpleNamespace(rows=rows, summary=summary)
    result.to_dict = lambda: {"rows": rows, "summary": summary}
    return lambda **options: result


def test_validate_serve_json(cli, monkeypatch):
    monkeypatch.setattr("simulator.serving.validation.validate_serving",
                        fake_serving_validation(True))
    data = one_json_object(cli("validate", "serve", "--json"))
    assert data["summary"]["tail latency"]["target"] is None
    assert data["rows"][0]["predicted"] == 950.0


def test_validate_serve_tables_and_strict_exit_code(cli, monkeypatch):
    monkeypatch.setattr("simulator.serving.validation.validate_serving",
                        fake_serving_validation(False))
    result = cli("validate", "serve")
    assert result.exit_code == 0, result.stderr
    for text in ("throughput: predicted vs measured", "-5.0%", "+20.0%", "median abs error",
                 "PASS", "FAIL", "Paper M"):
        assert text in result.stdout
    tail = [line for line in result.stdout.splitlines() if line.strip().startswith("tail")][-1]
    assert tail.split()[-2:] == ["-", "-"]  # no target, no verdict
    assert cli("validate", "serve", "--strict").exit_code == 1
    assert cli("validate", "serve", "--strict", "--json").exit_code == 1


def test_strict_ignores_groups_without_a_target(cli, monkeypatch):
    monkeypatch.setattr("simulator.serving.validation.validate_serving",
                        fake_serving_validation(True))
    assert cli("validate", "serve", "--strict").exit_code == 0


def test_validate_serve_real_run(cli):
    """The real published rows (about 2 s)."""
    data = one_json_object(cli("validate", "serve", "--json"))
    assert set(data["summary"]) == {"throughput", "median latency", "tail latency",
                                    "vllm rows: median TTFT, TPOT", "vllm rows: throughput"}
    assert data["summary"]["tail latency"]["passed"] is None
    assert all({"predicted", "measured", "error", "source"} <= set(r) for r in data["rows"])
    for group in ("throughput", "median latency"):  # the acceptance targets (<= 15%)
        assert data["summary"][group]["passed"], data["summary"][group]


def test_tune_serve_contract_and_emit(cli, tmp_path):
    workload = write_yaml(tmp_path / "w.yaml", {
        "num_requests": 40, "input_tokens": {"distribution": "fixed", "value": 256},
        "output_tokens": {"distribution": "fixed", "value": 64}})
    out_dir = tmp_path / "launch"
    result = cli("tune", "serve", "--model", "llama-2-7b", "--cluster", "2xa100-80gb",
                 "--workload", workload, "--json", "--emit", "vllm,sglang", "--out", out_dir)
    data = one_json_object(result)
    assert set(data) >= {"plan", "report", "baselines", "search", "resharding_over_static", "pruned"}
    assert data["baselines"]["static"]["report"]["output_tokens_per_s"] > 0
    assert data["search"]["evaluated"] == data["search"]["feasible"] + data["search"]["infeasible"]
    assert {p.name for p in out_dir.iterdir()} >= {"vllm_serve.sh", "sglang_serve.sh", "deployment.yaml"}
    static = yaml.safe_load((out_dir / "deployment.yaml").read_text())
    assert static == data["baselines"]["static"]["plan"]  # the launch files are the static winner's


def test_tune_serve_unknown_engine_exits_2(cli, small_workload):
    result = cli("tune", "serve", "--model", "llama-2-7b", "--cluster", "1xa100-80gb",
                 "--workload", small_workload, "--emit", "tgi")
    assert result.exit_code == 2 and "emit" in result.stderr


# --- tune spec -------------------------------------------------------------------------------

SPEC = ["--target", "llama-2-7b", "--draft", "llama-68m", "--cluster", "1xa100-80gb"]


def test_tune_spec_json_contract_and_policies_on_a_workload(cli, small_workload, tmp_path):
    data = one_json_object(cli("tune", "spec", *SPEC, "--acceptance", "0.7", "--batch-sizes", "1,8,64",
                               "--workload", small_workload, "--json", "--plot", tmp_path / "k.png"))
    assert [r["batch_size"] for r in data["policy"]] == [1, 8, 64]
    assert all({"batch_size", "k", "speedup"} <= set(r) for r in data["policy"])
    ks = [r["k"] for r in data["policy"]]
    assert ks == sorted(ks, reverse=True) and ks[0] > 0
    assert set(data["workload"]) == {"none", "fixed", "adaptive", "goodput"}
    assert data["workload"]["fixed"]["speculation"]["k_histogram"] == {
        str(data["best_fixed_k"]): data["workload"]["fixed"]["speculation"]["decode_steps"]}
    assert data["workload"]["adaptive"]["tpot_s"]["p50"] < data["workload"]["none"]["tpot_s"]["p50"]
    assert (tmp_path / "k.png").stat().st_size > 0


def test_tune_spec_from_a_measured_profile_and_an_acceptance_trace(cli, tmp_path):
    profile = {"profile": {"context": 200,
                           "target": [{"batch_size": b, "tokens_per_seq": n, "seconds": 0.02 + 0.001 * b * n}
                                      for b in (1, 4, 16) for n in range(1, 6)],
                           "draft": []},
               "acceptance": {"per_request": [0.5, 0.7, 0.9]}}
    path = tmp_path / "measured.json"
    path.write_text(json.dumps(profile))
    data = one_json_object(cli("tune", "spec", "--profile", path, "--json"))
    assert [r["batch_size"] for r in data["policy"]] == [1, 2, 4, 8, 16] and data["k_max"] == 4
    assert data["policy"][0]["k"] == 4 and data["policy"][-1]["k"] < 4
    trace = tmp_path / "acc.csv"
    trace.write_text("acceptance\n0.4\n0.6\n")
    data = one_json_object(cli("tune", "spec", *SPEC, "--acceptance-trace", trace, "--batch-sizes", "1", "--json"))
    assert data["policy"][0]["k"] > 0


@pytest.mark.parametrize("args,message", [
    (["--acceptance", "1.2"], "acceptance.mean = 1.2: Input should be less than 1"),
    (["--acceptance", "0.5", "--acceptance-trace", "x.csv"], "not both"),
    (["--acceptance", "0.5", "--batch-sizes", "0,4"], "each >= 1"),
    (["--acceptance", "0.5", "--emit", "tgi"], "emit"),
])
def test_tune_spec_bad_input_exits_2_naming_the_option(cli, args, message):
    result = cli("tune", "spec", *SPEC, *args)
    assert result.exit_code == 2 and message in result.stderr, result.stderr
