"""The collective benchmark on 2 real gloo ranks, the rank helper's failure report, and the
alpha-beta fit on synthetic data. Each spawn costs a few seconds of torch imports."""

import numpy as np
import pandas as pd
import pytest
import torch.distributed as dist

from profiler import collectives
from profiler.context import ProfileContext
from profiler.ranks import RankError, run_ranks
from profiler.timers import Timer
from simulator.specs.profile import TABLES


def test_sweep_lists_every_collective_at_powers_of_4():
    shapes = collectives.sweep(ProfileContext(quick=True, ranks=(2, 4)))
    assert {s["backend"] for s in shapes} == {"gloo"}
    assert sorted({s["bytes"] for s in shapes}) == [4096 * 4**i for i in range(6)]  # 4 KiB..4 MiB
    assert len(shapes) == 2 * len(collectives.COLLECTIVES) * 6
    assert max(s["bytes"] for s in collectives.sweep(ProfileContext(ranks=(2,)))) == 64 * 2**20
    with pytest.raises(ValueError, match="ranks >= 2"):
        collectives.sweep(ProfileContext(ranks=(1,)))


def test_two_gloo_ranks_measure_every_collective_in_one_spawn():
    ctx = ProfileContext(quick=True, ranks=(2,), timer=Timer("cpu", warmup=1, reps=3, min_reps=2, budget_s=0.05))
    shapes = [s for s in collectives.sweep(ctx) if s["bytes"] <= 256 * 1024]
    rows = list(collectives.measure(ctx, shapes))
    assert [(r["collective"], r["bytes"]) for r in rows] == [(s["collective"], s["bytes"]) for s in shapes]
    for row in rows:
        assert set(TABLES["collectives"].columns) <= set(row)
        assert 0 < row["p10_s"] <= row["median_s"] <= row["p90_s"] and row["mean_s"] >= row["p10_s"]
        # small messages get SMALL_REPS repetitions whatever the timer says: their mean is the fit's
        small = row["bytes"] <= collectives.SMALL_BYTES
        assert row["reps"] == collectives.SMALL_REPS if small else 2 <= row["reps"] <= 3


def _rank_1_raises(rank, world_size):
    if rank == 1:
        raise ValueError("rank one fails on purpose")
    dist.barrier()  # rank 0 waits for a peer that never comes: the parent must not hang


def test_a_failing_rank_is_named_in_the_parent_with_its_traceback():
    with pytest.raises(RankError, match=r"rank 1 of 2 failed") as err:
        run_ranks(_rank_1_raises, 2, timeout_s=60)
    assert err.value.rank == 1
    assert "ValueError: rank one fails on purpose" in str(err.value)
    assert "_rank_1_raises" in err.value.detail  # the rank's traceback, not just the message


def _alpha_beta_table(alpha_s, alg_bytes_per_s, cases):
    sizes = [4096 * 4**i for i in range(8)]
    noise = np.tile([1.01, 0.99, 1.0, 1.02, 0.98, 1.0, 1.01, 0.99], 1)
    rows = [{"backend": "gloo", "collective": c, "bytes": b, "ranks": n,
             "median_s": (alpha_s + b / alg_bytes_per_s) * e, "p10_s": 0.0, "p90_s": 0.0, "reps": 5}
            for c, n in cases for b, e in zip(sizes, noise)]
    return pd.DataFrame(rows)


def test_fit_recovers_alpha_and_bandwidth_and_applies_the_bus_factor():
    df = _alpha_beta_table(30e-6, 2e9, [("all_reduce", 4), ("all_gather", 4), ("send_recv", 2)])
    fit = collectives.fit(df, {})
    ar = fit["gloo"]["all_reduce"]["4"]
    assert ar["alpha_s"] == pytest.approx(30e-6, rel=0.05)
    assert ar["alg_bytes_per_s"] == pytest.approx(2e9, rel=0.03)
    assert ar["bus_bytes_per_s"] == pytest.approx(1.5 * ar["alg_bytes_per_s"])  # 2(n-1)/n
    ag = fit["gloo"]["all_gather"]["4"]
    assert ag["bus_bytes_per_s"] == pytest.approx(0.75 * ag["alg_bytes_per_s"])  # (n-1)/n
    sr = fit["gloo"]["send_recv"]["2"]
    assert sr["bus_bytes_per_s"] == sr["alg_bytes_per_s"]
    assert 0 <= ar["cv_median_abs_error"] < 0.03 and ar["samples"] == 8
    assert fit["samples"] == 24 and 0 <= fit["cv_median_abs_error"] < 0.03


def test_fit_reads_the_mean_where_the_table_has_it():
    """A step spends the sum of its calls: a heavy tail moves the mean, and the fit follows it."""
    df = _alpha_beta_table(30e-6, 2e9, [("all_reduce", 2)])
    median_only = collectives.fit(df, {})["gloo"]["all_reduce"]["2"]["alpha_s"]
    df["mean_s"] = df["median_s"] + 1e-3          # a millisecond of tail on every size
    with_mean = collectives.fit(df, {})["gloo"]["all_reduce"]["2"]["alpha_s"]
    assert median_only == pytest.approx(30e-6, rel=0.05)
    assert with_mean == pytest.approx(1e-3 + 30e-6, rel=0.05)
