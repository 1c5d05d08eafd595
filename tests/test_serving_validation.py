"""The vLLM load rows of `simtune validate serve`: what the replay reaches per row (about 2 s).

Targets per vLLM row: median TTFT and TPOT within 25%, throughput within 10%. Reached:
throughput and TPOT on every row, TTFT at 1 request/s; TTFT under load (3 and 4 requests/s,
where requests queue for KV blocks) is still 33-41% short. README, serving validation, says
what is missing.
"""

from __future__ import annotations

import pytest

from simulator.serving.validation import ROW_TARGETS, validate_serving


@pytest.fixture(scope="module")
def result():
    return validate_serving()


def vllm_errors(result, quantity: str) -> dict[str, float]:
    return {r["id"]: r["error"] for r in result.rows if r["id"].startswith("vllm") and r["quantity"] == quantity}


def test_every_vllm_throughput_is_within_10_percent(result):
    errors = vllm_errors(result, "requests/s")
    assert len(errors) == 3 and all(abs(e) <= 0.10 for e in errors.values()), errors
    assert result.summary["vllm rows: throughput"]["passed"]


def test_every_vllm_median_tpot_is_within_25_percent(result):
    errors = vllm_errors(result, "TPOT p50")
    assert len(errors) == 2 and all(abs(e) <= 0.25 for e in errors.values()), errors


def test_median_ttft_reached_at_low_load_and_the_residual_under_load(result):
    errors = vllm_errors(result, "TTFT p50")
    assert abs(errors["vllm-opt13b-rate1"]) <= 0.25
    for row in ("vllm-opt13b-rate3", "vllm-opt13b-rate4"):  # predicted too low: honest residual
        assert -0.45 <= errors[row] < -0.25, (row, errors[row])
    assert result.summary["vllm rows: median TTFT, TPOT"]["passed"] is False


def test_row_targets_are_reported_next_to_the_group_targets(result):
    for group, (target, _) in ROW_TARGETS.items():
        assert result.summary[group]["target"] == target
    for group in ("throughput", "median latency"):  # the aggregate acceptance targets still hold
        assert result.summary[group]["passed"], result.summary[group]
