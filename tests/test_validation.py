"""Validation against published measurements (Narayanan et al. SC'21, Korthikanti et al. MLSys'23)."""

from __future__ import annotations

import math

import pytest

from simulator.validation import validate_training


@pytest.fixture(scope="module")
def result():
    return validate_training()


@pytest.mark.parametrize("group,target", [("iteration time", 0.10), ("memory", 0.15)])
def test_mean_absolute_error_meets_target(result, group, target):
    summary = result.summary[group]
    assert summary["n"] > 0
    assert summary["mae"] <= target, summary
    assert summary["passed"]
    assert summary["n"] == sum(1 for r in result.rows if r["group"] == group)


def test_every_row_is_finite_and_cited(result):
    assert result.rows
    for row in result.rows:
        assert math.isfinite(row["predicted"]) and row["predicted"] > 0, row
        assert math.isfinite(row["measured"]) and row["measured"] > 0, row
        assert row["error"] == pytest.approx((row["predicted"] - row["measured"]) / row["measured"])
        assert row["source"], row
