"""The sweep runner: scenarios (cross product and filter), a row per failing scenario, resume
after an interruption, the same table in-process / on the pool / on Ray, costs, determinism."""

from __future__ import annotations

import importlib.util
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from profiler.ranks import free_port
from simtune.cli import app
from simulator.errors import SpecError
from simulator.specs.catalog import load_cluster
from tuner.sweep import load_sweep, parse_sweep, run_sweep
from tuner.sweep.analysis import best_per_group, pareto_front
from tuner.sweep.commands import COMMANDS, Command

TRAIN = {
    "command": "simulate train",
    "options": {"plan": "debug", "plan.global_batch_size": 8},
    "axes": {"model": ["gpt-debug", "llama-debug"], "cluster": ["2xa100-80gb", "2xa100-40gb"],
             "plan.micro_batch_size": [1, 2, 4]},
}
NONDETERMINISTIC = ["seconds"]


def _same(a: pd.DataFrame, b: pd.DataFrame) -> None:
    a = a.drop(columns=NONDETERMINISTIC).sort_values("scenario_id").reset_index(drop=True)
    b = b.drop(columns=NONDETERMINISTIC).sort_values("scenario_id").reset_index(drop=True)
    pd.testing.assert_frame_equal(a, b[a.columns])


# --- the spec ------------------------------------------------------------------------------


def test_cross_product_and_filter():
    spec = parse_sweep({**TRAIN, "where": "not (model == 'llama-debug' and plan.micro_batch_size > 1)"})
    scenarios = spec.scenarios()
    assert len(scenarios) == 2 * 2 * 3 - 2 * 2
    keys = [(s.keys["model"], s.keys["cluster"], s.keys["plan.micro_batch_size"]) for s in scenarios]
    assert keys[:3] == [("gpt-debug", "2xa100-80gb", m) for m in (1, 2, 4)]  # axis order, last fastest
    assert ("llama-debug", "2xa100-80gb", 2) not in keys and ("llama-debug", "2xa100-40gb", 1) in keys
    assert all(s.options["plan"] == "debug" for s in scenarios)
    assert len({s.id for s in scenarios}) == len(scenarios)
    # ids depend on the scenario, not on its neighbours: a narrower sweep names the same scenarios
    narrower = parse_sweep({**TRAIN, "axes": {**TRAIN["axes"], "model": ["gpt-debug"]}}).scenarios()
    assert {s.id for s in narrower} <= {s.id for s in parse_sweep(TRAIN).scenarios()}
    # the filter's helpers read the catalog
    spec = parse_sweep({**TRAIN, "where": "devices(cluster) == 2 and layers(model) >= 1 and model.startswith('gpt')"})
    assert {s.keys["model"] for s in spec.scenarios()} == {"gpt-debug"}


@pytest.mark.parametrize("where, says", [
    ("__import__('os').system('true')", "not allowed"),
    ("model.__class__", "not allowed"),
    ("[x for x in 'ab']", "not allowed"),
    ("open('/etc/passwd')", "not allowed"),
    ("lambda: 1", "not allowed"),
    ("nodel == 'x'", "unknown name 'nodel'"),
    ("model ==", "not a valid expression"),
])
def test_filter_refuses_what_is_not_an_expression_over_the_axes(where, says):
    with pytest.raises(SpecError, match=says):
        parse_sweep({**TRAIN, "where": where})


def test_filter_bounds_powers():
    spec = parse_sweep({**TRAIN, "where": "2 ** (10 ** 9) > plan.micro_batch_size"})
    with pytest.raises(SpecError, match="exponent"):
        spec.scenarios()


@pytest.mark.parametrize("change, field", [
    ({"command": "simulate everything"}, "sweep.command"),
    ({"axes": {"model": ["gpt-debug"], "modle": ["x"]}}, "sweep.modle"),
    ({"axes": {"model": []}}, "sweep.axes.model"),
    ({"axes": {"model": [{"a": 1}]}}, "sweep.axes.model"),
    ({"axes": {"cluster": ["2xa100-80gb"]}}, "sweep.options"),  # no model
    ({"timeout_s": -1}, "sweep.timeout_s"),
    ({"colour": "red"}, "sweep.colour"),
])
def test_spec_errors_name_the_field(change, field):
    with pytest.raises(SpecError) as e:
        parse_sweep({**TRAIN, **change})
    assert e.value.field == field


# --- running ---------------------------------------------------------------------------------


def test_failing_scenarios_are_rows_and_the_rest_continue(tmp_path, monkeypatch):
    train = COMMANDS["simulate train"]

    def boom(opts):
        if opts["model"] == "gpt-debug":
            raise RuntimeError("kaput")
        if opts["model"] == "slow":
            time.sleep(5)
        return train.run(opts)

    flaky = Command("simulate train", *[getattr(train, f) for f in ("options", "required", "specs")],
                    boom, "iteration_time_s", "cost_per_million_tokens_usd")
    monkeypatch.setitem(COMMANDS, "simulate train", flaky)
    spec = parse_sweep({"command": "simulate train", "options": {"cluster": "2xa100-80gb", "plan": "debug"},
                        "timeout_s": 0.5,
                        "axes": {"model": ["llama-debug", "gpt-debug", "no-such-model", "slow", "gpt3-175b"]}})
    result = run_sweep(spec, tmp_path, workers=1)
    df = pd.read_parquet(result.table_path).set_index("model")
    assert df.loc["llama-debug", "status"] == "ok" and df.loc["llama-debug", "iteration_time_s"] > 0
    assert df.loc["gpt-debug", "status"] == "error" and df.loc["gpt-debug", "message"] == "RuntimeError: kaput"
    assert df.loc["no-such-model", "status"] == "spec_error" and "unknown model" in df.loc["no-such-model", "message"]
    assert df.loc["slow", "status"] == "timeout" and df.loc["slow", "seconds"] < 2
    assert df.loc["gpt3-175b", "status"] == "infeasible" and "GiB" in df.loc["gpt3-175b", "message"]
    assert result.status == {"ok": 1, "infeasible": 1, "spec_error": 1, "error": 1, "timeout": 1}


def test_resume_after_an_interrupted_run(tmp_path):
    spec = parse_sweep(TRAIN)

    def interrupt(done, total):
        if done >= 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_sweep(spec, tmp_path, workers=1, chunk=1, flush_every_s=0.0, progress=interrupt)
    kept = pd.read_parquet(tmp_path / "results.parquet")
    assert len(kept) == 5 and (kept["status"] == "ok").all()
    with pytest.raises(SpecError, match="--resume"):
        run_sweep(spec, tmp_path, workers=1)
    result = run_sweep(spec, tmp_path, workers=1, resume=True)
    assert (result.skipped, result.ran) == (5, 7)
    full = pd.read_parquet(tmp_path / "results.parquet")
    assert sorted(full["scenario_id"]) == sorted(s.id for s in spec.scenarios())
    again = run_sweep(spec, tmp_path, workers=1, resume=True)
    assert (again.skipped, again.ran) == (12, 0)


def test_cost_columns(tmp_path):
    spec = parse_sweep({**TRAIN, "axes": {**TRAIN["axes"], "cluster": ["2xa100-80gb", "2xcpu"]},
                        "where": "cluster != '2xcpu' or model == 'gpt-debug'"})
    df = pd.read_parquet(run_sweep(spec, tmp_path, workers=1).table_path)
    gpu = df[df["cluster"] == "2xa100-80gb"]
    price = load_cluster("2xa100-80gb").price_per_device_hour
    assert price and (gpu["price_per_device_hour"] == price).all()
    per_iteration = price * 2 * gpu["iteration_time_s"] / 3600
    assert gpu["cost_per_iteration_usd"].to_numpy() == pytest.approx(per_iteration.to_numpy())
    tokens = gpu["tokens_per_s"] * gpu["iteration_time_s"]
    assert gpu["cost_per_million_tokens_usd"].to_numpy() == pytest.approx((per_iteration / tokens * 1e6).to_numpy())
    assert df[df["cluster"] == "2xcpu"]["cost_per_million_tokens_usd"].isna().all()  # no price, no cost
    # rank by cost: the Pareto front is not dominated, and the best per model is its cheapest
    front = pareto_front(df, "iteration_time_s", "cost_per_million_tokens_usd")
    assert len(front) >= 1 and front["iteration_time_s"].is_monotonic_increasing
    assert front["cost_per_million_tokens_usd"].is_monotonic_decreasing
    best = best_per_group(df, spec, ["model"], "cost")
    assert best.set_index("model")["cost_per_million_tokens_usd"].to_dict() == \
        gpu.groupby("model")["cost_per_million_tokens_usd"].min().to_dict()


def test_pool_gives_the_same_table_as_one_process(tmp_path):
    spec = parse_sweep(TRAIN)
    serial = pd.read_parquet(run_sweep(spec, tmp_path / "serial", workers=1).table_path)
    pool = pd.read_parquet(run_sweep(spec, tmp_path / "pool", workers=2, chunk=2).table_path)
    _same(serial, pool)


def test_serving_sweep_is_deterministic_across_processes(tmp_path):
    """The same seed gives the same report in this process and in spawned workers; another
    seed gives another one (the workload draws its arrivals and lengths)."""
    spec = parse_sweep({"command": "simulate serve",
                        "options": {"model": "llama-debug", "cluster": "1xa100-80gb", "deployment": "vllm-tp1",
                                    "workload": "sharegpt-poisson-2", "workload.num_requests": 12},
                        "axes": {"workload.seed": [1, 2, 1001]}})
    serial = pd.read_parquet(run_sweep(spec, tmp_path / "serial", workers=1).table_path)
    pool = pd.read_parquet(run_sweep(spec, tmp_path / "pool", workers=2, chunk=1).table_path)
    _same(serial, pool)
    assert (serial["status"] == "ok").all()
    assert serial["makespan_s"].nunique() == 3
    assert (serial["cost_per_million_output_tokens_usd"] > 0).all()


# --- Ray: a head on 127.0.0.1, as a multi-node cluster's head would be -------------------------



def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="Ray is not installed (pip install simtune[ray])")
def test_ray_cluster_gives_the_same_table_as_one_process_and_the_pool(tmp_path, monkeypatch):
    # Ray's socket paths must stay under 108 bytes: its folder is a short one in /tmp, not tmp_path.
    short = Path(tempfile.mkdtemp(prefix="st-ray-", dir="/tmp"))
    home, port = short / "home", free_port()
    token = home / ".ray" / "auth_token"  # the cluster's token: the head and the driver read it
    token.parent.mkdir(parents=True)
    token.write_text(secrets.token_hex(32))
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}
    env = {**os.environ, **auth, "HOME": str(home), "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    ray_bin = Path(sys.executable).parent / "ray"
    head = subprocess.Popen([str(ray_bin), "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
                             "--port", str(port), "--num-cpus", "2", "--include-dashboard", "false",
                             "--temp-dir", str(short / "r")], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not _listening(port) and time.monotonic() < deadline and head.poll() is None:
            time.sleep(0.2)
        assert head.poll() is None, "ray start --head exited"
        for k, v in auth.items():
            monkeypatch.setenv(k, v)
        spec = parse_sweep({**TRAIN, "axes": {**TRAIN["axes"], "plan.micro_batch_size": [1, 2]}})
        on_ray = run_sweep(spec, tmp_path / "ray", workers=2, chunk=2, ray=f"127.0.0.1:{port}")
        assert on_ray.ran == len(spec.scenarios()) and on_ray.backend.startswith("ray")
        # the pool's table equals this one (test above), so Ray's equals the pool's
        serial = run_sweep(spec, tmp_path / "serial", workers=1)
        _same(pd.read_parquet(serial.table_path), pd.read_parquet(on_ray.table_path))
    finally:
        _end(head)
        shutil.rmtree(short, ignore_errors=True)


def _end(head: subprocess.Popen) -> None:
    """End the head we started: SIGTERM to `ray start` (it drains and stops the processes it
    started); if it does not exit, SIGKILL its process group (only what it started)."""
    head.terminate()
    try:
        head.wait(timeout=45)
    except subprocess.TimeoutExpired:
        os.killpg(head.pid, signal.SIGKILL)
        head.wait()
    try:  # stragglers of the group, if any
        os.killpg(head.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


# --- the command line --------------------------------------------------------------------------


def test_cli_runs_reports_and_plots(tmp_path):
    spec_path = tmp_path / "sweep.yaml"
    import yaml

    spec_path.write_text(yaml.safe_dump({**TRAIN, "axes": {**TRAIN["axes"], "plan.micro_batch_size": [1, 9]}},
                                        sort_keys=False))  # the first axis (model) groups the report
    runner = CliRunner()
    res = runner.invoke(app, ["sweep", str(spec_path), "--out", str(tmp_path / "out"), "--workers", "1", "--json",
                              "--rank-by", "cost"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["status"]["ok"] == 4 and data["status"]["spec_error"] == 4  # 8 is no multiple of 9
    assert data["best"][0]["cost_per_million_tokens_usd"] == min(r["cost_per_million_tokens_usd"] for r in data["best"])
    res = runner.invoke(app, ["sweep", "--report", str(tmp_path / "out"), "--json", "--plot", str(tmp_path / "f.png")])
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert {r["model"] for r in report["best_per_group"]} == {"gpt-debug", "llama-debug"}
    assert report["pareto_front"] and (tmp_path / "f.png").stat().st_size > 0
    assert load_sweep(tmp_path / "out" / "sweep.yaml").axes == parse_sweep(yaml.safe_load(spec_path.read_text())).axes
    res = runner.invoke(app, ["sweep", str(spec_path), "--out", str(tmp_path / "out")])
    assert res.exit_code == 2 and "--resume" in res.output


# --- robustness: any spec mapping and any filter text ends in a spec or a named error ---------

SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-10**12, 10**12), st.text(max_size=12),
                    st.floats(allow_nan=True, allow_infinity=True))
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                                         max_size=4), max_leaves=12)
NAMES = st.sampled_from(["model", "cluster", "plan", "plan.tp", "workload.seed", "modle", "", "a.b.c"])
SPECS = st.fixed_dictionaries({}, optional={
    "command": st.sampled_from([*COMMANDS, "simulate", 3, None]),
    "options": st.one_of(VALUES, st.dictionaries(NAMES, SCALARS, max_size=3)),
    "axes": st.one_of(VALUES, st.dictionaries(NAMES, st.lists(SCALARS, max_size=4), max_size=3)),
    "where": st.one_of(st.text(max_size=30), SCALARS),
    "timeout_s": SCALARS,
    "colour": SCALARS,
})


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(SPECS)
def test_any_spec_mapping_is_a_sweep_or_a_named_error(data):
    try:
        spec = parse_sweep(data)
    except SpecError as e:
        assert e.field.startswith("sweep")
        return
    assert spec.command in COMMANDS and spec.axes


WHERE_TEXT = st.one_of(
    st.text(max_size=40),
    st.lists(st.sampled_from(["model", "plan.micro_batch_size", "==", "<", "and", "or", "not", "(", ")", "1", "0",
                              "'gpt-debug'", "+", "**", "/", "in", "[1, 2]", "devices(cluster)", "len(", ",",
                              "9 ** 99", "model.startswith('g')", "1e308 * 1e308", "-"]), max_size=12).map(" ".join))


@settings(max_examples=300, deadline=None)
@given(WHERE_TEXT)
def test_any_filter_text_filters_or_is_a_named_error(text):
    try:
        spec = parse_sweep({**TRAIN, "where": text})
        kept = spec.scenarios()
    except SpecError as e:
        assert e.field == "sweep.where"
        return
    assert len(kept) <= 12


def test_an_unwritable_folder_is_a_named_error_and_leaves_no_file(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(SpecError, match="cannot write sweep.yaml"):
        run_sweep(parse_sweep(TRAIN), blocker / "out", workers=1)
    example = Path(__file__).resolve().parents[1] / "examples" / "sweeps" / "gpt3-clusters.yaml"
    res = CliRunner().invoke(app, ["sweep", str(example), "--out", str(blocker / "out"),
                                   "--workers", "1"])
    assert res.exit_code == 2 and "error:" in res.stderr and "Traceback" not in res.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]


@pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="Ray is not installed (pip install simtune[ray])")
def test_local_ray_twice_in_one_process(tmp_path):
    """`--ray auto` starts a local instance and ends it; a second sweep in the same process
    (a notebook, a script) starts another."""
    spec = parse_sweep({**TRAIN, "axes": {**TRAIN["axes"], "cluster": ["2xa100-80gb"], "plan.micro_batch_size": [1]}})
    serial = pd.read_parquet(run_sweep(spec, tmp_path / "serial", workers=1).table_path)
    for n in range(2):
        on_ray = run_sweep(spec, tmp_path / f"ray{n}", workers=2, ray="auto")
        assert on_ray.status["ok"] == 2
        _same(serial, pd.read_parquet(on_ray.table_path))
