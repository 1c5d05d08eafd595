"""GNN tuner: never slower than DistDGL's defaults, the global-batch bound, launch files, CLI contract."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from simtune.cli import app
from simulator.errors import SpecError
from simulator.gnn.simulate import simulate_gnn
from simulator.specs.catalog import load_cluster
from tuner import gnn as gnn_tuner
from tuner.gnn import candidates, launch_files, tune_gnn


@pytest.fixture
def small_space(monkeypatch):
    """A smaller grid keeps the searches of these tests under a few seconds."""
    monkeypatch.setattr(gnn_tuner, "BATCHES", (500, 2000))
    monkeypatch.setattr(gnn_tuner, "CACHE", (0.0, 0.3))
    monkeypatch.setattr(gnn_tuner, "SAMPLERS", (0, 4))


def test_tuned_plan_is_never_slower_than_the_baseline(small_space):
    result = tune_gnn("community-20k", "graphsage-3", "2xm5n-24xlarge")
    assert result.baseline is not None
    assert result.best.report.epoch_time_s <= result.baseline.report.epoch_time_s
    assert result.speedup >= 1.0
    again = simulate_gnn("community-20k", "graphsage-3", "2xm5n-24xlarge", result.best.plan)
    assert again.epoch_time_s == pytest.approx(result.best.report.epoch_time_s, rel=1e-9)
    s = result.search
    assert s["evaluated"] == s["feasible"] + s["infeasible"] and s["evaluations_per_s"] > 0


def test_global_batch_bound_holds_for_every_candidate():
    cluster = load_cluster("4xm5n-24xlarge")
    plans = list(candidates(cluster, 8000))
    assert plans and all(4 * p.trainers_per_machine * p.batch_size_per_trainer <= 8000 for p in plans)
    assert all(p.feature_cache_fraction == 0 for p in plans if p.feature_placement == "replicated")


def test_a_tight_bound_leaves_out_the_baseline_but_still_tunes(small_space):
    result = tune_gnn("community-20k", "graphsage-3", "2xm5n-24xlarge", max_global_batch=1000)
    assert result.baseline is None
    assert 2 * result.best.plan.trainers_per_machine * result.best.plan.batch_size_per_trainer <= 1000


def test_bad_bound_names_the_field():
    with pytest.raises(SpecError) as e:
        tune_gnn("community-20k", "graphsage-3", "2xm5n-24xlarge", max_global_batch=0)
    assert e.value.field == "max_global_batch" and e.value.value == 0


def test_launch_files_carry_dgl_launch_and_one_ip_per_machine():
    from simulator.specs.catalog import load_gnn_plan

    files = launch_files("ogbn-products", "ogbn-products", "graphsage-3", "graphsage-3", "4xm5n-24xlarge",
                         load_gnn_plan("distdgl-default"))
    dgl = files["launch_dgl.sh"]
    for flag in ("tools/launch.py", "--num_trainers 2", "--num_samplers 4", "--num_servers 1",
                 "--part_config data/ogbn-products.json", "--ip_config ip_config.txt", "train_dist.py",
                 "--fan_out 5,10,15", "--batch_size 2000"):
        assert flag in dgl
    assert len(files["ip_config.txt"].splitlines()) == 4
    assert "simtune run gnn" in files["run_simtune.sh"] and "--nproc 8" in files["run_simtune.sh"]


def test_tune_gnn_cli_json_contract_and_emit(small_space, tmp_path):
    result = CliRunner().invoke(app, ["tune", "gnn", "--graph", "community-20k", "--model", "graphsage-3",
                                      "--cluster", "2xm5n-24xlarge", "--json", "--emit", "dgl", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert {"plan", "report", "baselines", "search"} <= set(data)
    assert set(data["baselines"]) == {"distdgl"} and {"plan", "report"} <= set(data["baselines"]["distdgl"])
    assert {"evaluated", "feasible", "infeasible", "seconds", "evaluations_per_s"} <= set(data["search"])
    assert "epoch_time_s" in data["report"]
    for name in ("launch_dgl.sh", "ip_config.txt", "run_simtune.sh", "plan.yaml"):
        assert (tmp_path / name).is_file()
    # the written plan is accepted unchanged by simulate gnn
    again = CliRunner().invoke(app, ["simulate", "gnn", "--graph", "community-20k", "--model", "graphsage-3",
                                     "--cluster", "2xm5n-24xlarge", "--plan", str(tmp_path / "plan.yaml"), "--json"])
    assert again.exit_code == 0, again.stderr
    assert json.loads(again.stdout)["epoch_time_s"] == pytest.approx(data["report"]["epoch_time_s"], rel=1e-9)


def test_tune_gnn_rejects_an_unknown_emit_format():
    result = CliRunner().invoke(app, ["tune", "gnn", "--graph", "community-20k", "--model", "graphsage-3",
                                      "--cluster", "2xm5n-24xlarge", "--emit", "megatron"])
    assert result.exit_code == 2 and "--emit" in result.stderr
