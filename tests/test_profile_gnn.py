"""The profiler's GNN family: it times the executor's operations and fits every cost model on a
cut-down sweep; a profile may gain it from another machine of the same kind; old profiles load."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pandas as pd
import pytest

import profiler.gnn as gnn
import profiler.store
from profiler.context import ProfileContext
from profiler.run import fit_tables, run_profile
from profiler.store import ProfileStore
from profiler.timers import Timer
from simulator.gnn import costs
from simulator.gnn.costs import OP_TERMS
from simulator.gnn.simulate import simulate_gnn
from simulator.specs.catalog import load_cluster
from simulator.specs.profile import ProfileError, apply_profile, load_profile, resolve_profile_path
from tests.test_profile_format import write_profile

FAST = Timer("cpu", warmup=0, reps=1, min_reps=1, budget_s=0.0)
FULL_SWEEP = gnn.sweep


def small_sweep(ctx: ProfileContext) -> list[dict]:
    """The three smallest shapes of each operation of the quick sweep."""
    shapes = FULL_SWEEP(ProfileContext(quick=True, timer=FAST))
    size = {"sample": lambda s: s["rows"] * s["fanout"], "aggregate": lambda s: s["rows"] * s["fanout"] * s["width"]}
    out = []
    for op in OP_TERMS:
        mine = [s for s in shapes if s["op"] == op]
        key = size.get(op.removesuffix("_input").replace("to_block", "sample"),
                       lambda s: s["rows"] * max(s["width"], 1) * max(s["d_out"], 1))
        out += sorted(mine, key=key)[:3]
    return out


def test_every_operation_is_swept_on_cpu_and_none_on_cuda():
    shapes = gnn.sweep(ProfileContext(quick=True, timer=FAST))
    assert {s["op"] for s in shapes} == set(OP_TERMS)
    assert gnn.sweep(ProfileContext(device="cuda", quick=True, timer=FAST)) == []


def test_gnn_family_fits_every_operation_on_a_cut_down_sweep():
    rows = list(gnn.measure(ProfileContext(quick=True, timer=FAST), small_sweep(None)))
    df = pd.DataFrame(rows)
    assert set(df["op"]) == set(OP_TERMS) and (df["median_s"] > 0).all()
    assert (df.loc[df["op"] == "sample", "edges"] > 0).all()
    assert (df.loc[df["op"] == "optimizer", "params"] > 0).all()
    fit = gnn.fit(df, {"kind": "cpu"})
    assert fit["samples"] == len(df)
    for op, terms in OP_TERMS.items():
        assert set(terms) <= set(fit[op])
        assert all(math.isfinite(fit[op][t]) and fit[op][t] >= 0 for t in terms)
        assert sum(fit[op][t] for t in terms) > 0


def test_simtune_profile_writes_the_gnn_table_and_its_fit(tmp_path, monkeypatch):
    monkeypatch.setattr(gnn, "sweep", small_sweep)
    monkeypatch.setattr(profiler.run.ProfileContext, "__post_init__", _fast_timer)
    root = run_profile(tmp_path / "p", ops=("gnn",))
    profile = load_profile(root)
    assert profile.tables["gnn"]["rows"] == len(small_sweep(None))
    assert set(OP_TERMS) <= set(profile.fit("gnn"))
    assert "gnn" in fit_tables(root)


def _fast_timer(self):
    object.__setattr__(self, "dtypes", ("fp32",))
    object.__setattr__(self, "timer", FAST)


def test_a_new_family_may_come_from_another_machine_of_the_same_kind(tmp_path, monkeypatch):
    root = write_profile(tmp_path / "p")       # gemm measured on this machine
    real = profiler.store.machine_meta
    monkeypatch.setattr(profiler.store, "machine_meta", lambda d, t: {**real(d, t), "name": "Another CPU"})
    with pytest.raises(ProfileError, match="device.name"):
        ProfileStore.open(root, "cpu", threads=1, ops=("gemm",))     # its own table: refused
    store = ProfileStore.open(root, "cpu", threads=1, ops=("gnn",))  # a new table: kept apart
    store.table("gnn").add({"op": "optimizer", "rows": 0, "fanout": 0, "width": 32, "d_out": 0,
                            "frontier": "uniform", "ranks": 1, "src": 0, "edges": 0, "candidates": 0, "elements": 0, "params": 10, "median_s": 1e-3, "p10_s": 1e-3,
                            "p90_s": 1e-3, "reps": 1})
    profile = load_profile(root)
    assert profile.tables["gnn"]["device"]["name"] == "Another CPU"
    assert profile.device["name"] != "Another CPU"
    ProfileStore.open(root, "cpu", threads=1, ops=("gnn",))          # and resumes there


def test_a_profile_without_the_family_still_loads_and_names_no_gnn_source(tmp_path):
    root = write_profile(tmp_path / "old")
    cluster = apply_profile(load_cluster("1xcpu", profile="none"), root)
    assert "gnn" not in cluster.device.cost_sources and "gemm" in cluster.device.cost_sources


def test_aggregation_fit_finds_the_cache_its_source_rows_fall_out_of():
    """Synthetic aggregation times with a knee at 2 MiB of source rows: the fit keeps the cache
    size of the grid that reproduces them, and the far term prices the reads beyond it."""
    from simulator.gnn.costs import far_share

    rows = []
    for r in (500, 2000, 8000):
        for f in (4, 12):
            for w in (32, 128, 256):
                src, edges = r + r * f // 4, r * f
                seconds = 2e-10 * edges * w + 1.5e-9 * edges * w * far_share(src, w, 2 * 2**20) + 5e-8 * edges
                rows.append({"op": "aggregate", "rows": r, "fanout": f, "width": w, "d_out": 0, "src": src,
                             "edges": edges, "elements": 0, "params": 0, "median_s": seconds})
    fit = gnn.fit(pd.DataFrame(rows), {"kind": "cpu"})["aggregate"]
    assert fit["cache_bytes"] == 2 * 2**20
    assert fit["s_per_far_edge_element"] == pytest.approx(1.5e-9, rel=0.05)
    assert far_share(1000, 32, 2 * 2**20) == 0 and 0 < far_share(16000, 256, 2 * 2**20) < 1


def test_every_timed_call_starts_with_cold_caches(monkeypatch):
    calls = []
    monkeypatch.setattr(gnn, "flush_caches", lambda: calls.append("flush"))
    shape = [s for s in small_sweep(None) if s["op"] == "relu_dropout"][:1]
    timer = Timer("cpu", warmup=0, reps=3, min_reps=3, budget_s=0.0)
    list(gnn.measure(ProfileContext(quick=True, timer=timer), shape))
    assert calls == ["flush"] * 3


def test_edge_end_frontiers_are_degree_biased_as_later_hops_are():
    rng = np.random.default_rng(0)
    degree = np.diff(gnn._graph().indptr)
    uniform, ends = gnn._frontier(1000, "uniform", rng), gnn._frontier(1000, "edge-end", rng)
    assert np.unique(ends).size == ends.size == 1000
    assert degree[ends].mean() > 2 * degree[uniform].mean()


def test_a_profiled_fetch_prices_the_feature_rows(tmp_path):
    """With a `fetch` fit the rows cost its per-row and per-element terms (a remote row twice,
    owner and requester); an older profile without one keeps the bandwidth formulas."""
    root = tmp_path / "p"
    shutil.copytree(resolve_profile_path(load_cluster("2xcpu").profile), root)
    meta = json.loads((root / "profile.json").read_text())
    meta["fits"]["gnn"]["fetch"] = {"s_per_row": 1e-7, "s_per_element": 2e-9, "overhead_s": 1e-4}
    (root / "profile.json").write_text(json.dumps(meta))
    cluster = load_cluster("2xcpu", profile=str(root))
    assert costs.fetch_local_s(4000 * 128, cluster, 1, 4000) == pytest.approx(1e-4 + 4000 * 1e-7 + 4000 * 32 * 2e-9)
    two_sided = costs.fetch_remote_s(4000 * 128, 1, cluster, 1, 4000) - costs.fetch_local_s(4000 * 128, cluster, 1, 4000)
    assert two_sided > costs.fetch_local_s(4000 * 128, cluster, 1, 4000)   # gathered twice, plus the exchange
    meta["fits"]["gnn"].pop("fetch")
    (root / "profile.json").write_text(json.dumps(meta))
    older = load_cluster("2xcpu", profile=str(root))
    assert costs.fetch_local_s(4000 * 128, older, 1, 4000) == pytest.approx(
        4000 * 128 / costs.local_gather_bytes_per_s(older))


def test_lockstep_rows_time_the_slowest_of_ranks_running_at_once_and_fit_a_ratio():
    ctx = ProfileContext(quick=True, timer=Timer("cpu", warmup=1, reps=3, min_reps=3, budget_s=0.0))
    alone = {"op": "relu_dropout", "rows": 1000, "fanout": 0, "width": 64, "d_out": 0, "frontier": "uniform",
             "ranks": 1}
    rows = list(gnn.measure(ctx, [alone, {**alone, "ranks": 2}]))
    assert [r["ranks"] for r in rows] == [1, 2] and all(r["median_s"] > 0 for r in rows)
    ratio = gnn.fit(pd.DataFrame(rows), {"kind": "cpu"})["lockstep"]["2"]
    assert ratio["compute"] == pytest.approx(rows[1]["median_s"] / rows[0]["median_s"])
    assert set(ratio["by_op"]) == {"relu_dropout"} and "sample" not in ratio


def test_lockstep_ratios_slow_the_stages_of_nxcpu_ranks_only(tmp_path):
    root = tmp_path / "p"
    shutil.copytree(resolve_profile_path(load_cluster("2xcpu").profile), root)
    meta = json.loads((root / "profile.json").read_text())
    meta["fits"]["gnn"]["lockstep"] = {"2": {"sample": 1.5, "fetch": 1.2, "compute": 1.25, "by_op": {}}}
    (root / "profile.json").write_text(json.dumps(meta))
    two, one = load_cluster("2xcpu", profile=str(root)), load_cluster("1xcpu", profile=str(root))
    assert costs.lockstep_factor(two, "compute") == 1.25 and costs.lockstep_factor(two, "sample") == 1.5
    assert costs.lockstep_factor(load_cluster("4xcpu", profile=str(root)), "fetch") == 1.2   # nearest count below
    assert costs.lockstep_factor(one, "compute") == 1.0                                      # one rank: alone
    assert costs.lockstep_factor(load_cluster("2xm5n-24xlarge"), "compute") == 1.0           # DistDGL's machines
    plan = {"partition": "random", "batch_size_per_trainer": 200}
    slowed = simulate_gnn("community-20k", "graphsage-3", two, plan).trainer_loads[0].stages_s
    meta["fits"]["gnn"].pop("lockstep")   # the same profile without lock-step rows
    (root / "profile.json").write_text(json.dumps(meta))
    plain = simulate_gnn("community-20k", "graphsage-3", load_cluster("2xcpu", profile=str(root)),
                         plan).trainer_loads[0].stages_s
    assert slowed["compute"] == pytest.approx(1.25 * plain["compute"])
