"""generate_requests: counts, bounds and means of lengths, arrivals, presets, traces, errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from simulator.errors import SpecError
from simulator.serving.workload import PRESETS, Request, describe_lengths, generate_requests
from simulator.specs.serving import WorkloadSpec

N = 20_000


def workload(**fields) -> WorkloadSpec:
    return WorkloadSpec.parse({"num_requests": N, **fields})


def lengths(requests: list[Request], name: str) -> np.ndarray:
    return np.array([getattr(r, name) for r in requests])


def test_fixed_lengths():
    reqs = generate_requests(workload(input_tokens={"value": 512}, output_tokens={"value": 64}))
    assert len(reqs) == N
    assert set(lengths(reqs, "input_tokens")) == {512}
    assert set(lengths(reqs, "output_tokens")) == {64}


def test_uniform_lengths_bounds_and_mean():
    reqs = generate_requests(workload(
        input_tokens={"distribution": "uniform", "min": 100, "max": 300},
        output_tokens={"distribution": "uniform", "min": 1, "max": 1},
    ))
    x = lengths(reqs, "input_tokens")
    assert len(reqs) == N and x.min() == 100 and x.max() == 300  # both ends reachable
    assert x.mean() == pytest.approx(200, rel=0.01)
    assert set(lengths(reqs, "output_tokens")) == {1}


def test_lognormal_mean_is_the_distribution_mean():
    reqs = generate_requests(workload(
        input_tokens={"distribution": "lognormal", "mean": 1000, "sigma": 0.5},
        output_tokens={"distribution": "lognormal", "mean": 50, "sigma": 1.0, "min": 5, "max": 400},
    ))
    x, y = lengths(reqs, "input_tokens"), lengths(reqs, "output_tokens")
    assert x.dtype.kind == "i" and x.min() >= 1
    assert x.mean() == pytest.approx(1000, rel=0.02)
    assert np.median(x) == pytest.approx(1000 * np.exp(-0.5**2 / 2), rel=0.03)
    assert y.min() >= 5 and y.max() <= 400 and (y == 5).any() and (y == 400).any()
    assert y.mean() == pytest.approx(50, rel=0.05)  # clipping moves it only a little


def test_offline_arrivals_all_at_zero():
    reqs = generate_requests(workload(preset="sharegpt-like"))
    assert all(r.arrival_s == 0.0 for r in reqs)
    assert [r.id for r in reqs] == list(range(N))


def test_poisson_interarrival_mean_and_order():
    rate = 4.0
    reqs = generate_requests(workload(preset="sharegpt-like",
                                      arrival={"kind": "poisson", "rate_per_s": rate}))
    t = np.array([r.arrival_s for r in reqs])
    gaps = np.diff(np.concatenate([[0.0], t]))
    assert (gaps >= 0).all() and t[0] > 0
    assert gaps.mean() == pytest.approx(1 / rate, rel=0.03)
    assert gaps.std() == pytest.approx(1 / rate, rel=0.05)  # exponential: std == mean
    assert [r.id for r in reqs] == list(range(N))


def test_determinism_by_seed_and_independent_streams():
    spec = {"preset": "sharegpt-like", "arrival": {"kind": "poisson", "rate_per_s": 2.0}}
    a = generate_requests(workload(**spec, seed=1))
    assert a == generate_requests(workload(**spec, seed=1))
    assert a != generate_requests(workload(**spec, seed=2))
    # a different arrival rate keeps the lengths (common random numbers in a rate sweep)
    faster = generate_requests(workload(**{**spec, "arrival": {"kind": "poisson", "rate_per_s": 8}},
                                        seed=1))
    assert [(r.input_tokens, r.output_tokens) for r in faster] == \
           [(r.input_tokens, r.output_tokens) for r in a]


@pytest.mark.parametrize("preset,input_mean,output_mean", [
    ("sharegpt-like", 161.31, 337.99),          # Kwon et al. SOSP'23, Fig. 11a
    ("arxiv-summarization-like", 8000, 200),    # our assumption, see PRESETS
])
def test_presets_match_documented_means(preset, input_mean, output_mean):
    reqs = generate_requests(workload(preset=preset))
    stats = describe_lengths(reqs)
    assert stats["num_requests"] == N
    assert stats["input_tokens_mean"] == pytest.approx(input_mean, rel=0.05)
    assert stats["output_tokens_mean"] == pytest.approx(output_mean, rel=0.05)
    dists = PRESETS[preset]
    for name in ("input_tokens", "output_tokens"):
        x, dist = lengths(reqs, name), getattr(dists, name)
        assert x.min() >= dist.min and x.max() <= dist.max
    assert stats["input_tokens_p50"] <= stats["input_tokens_p90"]


def test_describe_lengths():
    reqs = [Request(i, 0.0, 10 * (i + 1), 1) for i in range(10)]
    stats = describe_lengths(reqs)
    assert stats["input_tokens_mean"] == 55 and stats["input_tokens_p50"] == 55
    assert stats["input_tokens_p90"] == pytest.approx(91)
    assert stats["output_tokens_mean"] == 1
    with pytest.raises(ValueError):
        describe_lengths([])



# -- traces -----------------------------------------------------------------------------------


def test_csv_trace_sorted_limited_and_relative(tmp_path):
    (tmp_path / "t.csv").write_text(
        "arrival_s,input_tokens,output_tokens,note\n"
        "2.0,100,10,x\n"
        "0.5,200,20,y\n"
        "1.0,300,30,z\n"
        "0.1,400,40,w\n"
    )
    reqs = generate_requests(WorkloadSpec.parse({"trace": "t.csv", "num_requests": 3}),
                             base_dir=tmp_path)
    assert reqs == [Request(0, 0.5, 200, 20), Request(1, 1.0, 300, 30), Request(2, 2.0, 100, 10)]


def test_csv_trace_resolves_against_cwd(tmp_path, monkeypatch):
    (tmp_path / "t.csv").write_text("arrival_time,input_tokens,output_tokens\n0,5,6\n")
    monkeypatch.chdir(tmp_path)
    assert generate_requests(WorkloadSpec.parse({"trace": "t.csv"})) == [Request(0, 0.0, 5, 6)]


def test_jsonl_trace(tmp_path):
    rows = [{"arrival_s": 1.5, "input_tokens": 10, "output_tokens": 3},
            {"arrival_time": 0.25, "input_tokens": 20, "output_tokens": 4.0}]
    path = tmp_path / "t.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    reqs = generate_requests(WorkloadSpec.parse({"trace": str(path)}))
    assert reqs == [Request(0, 0.25, 20, 4), Request(1, 1.5, 10, 3)]


def test_trace_lengths_with_poisson_arrivals(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("input_tokens,output_tokens\n" + "".join(f"{i},1\n" for i in range(1, 101)))
    reqs = generate_requests(WorkloadSpec.parse(
        {"trace": str(path), "arrival": {"kind": "poisson", "rate_per_s": 1.0}}))
    assert [r.input_tokens for r in reqs] == list(range(1, 101))  # row order kept
    assert all(a.arrival_s < b.arrival_s for a, b in zip(reqs, reqs[1:]))


@pytest.mark.parametrize("row,line,message", [
    ("0.0,abc,5", 3, "input_tokens must be a positive integer"),
    ("0.0,0,5", 3, "input_tokens must be a positive integer"),
    ("0.0,7,2.5", 3, "output_tokens must be a positive integer"),
    ("-1,7,5", 3, "arrival_s must be a finite number of seconds >= 0"),
    ("nan,7,5", 3, "arrival_s must be a finite"),
    ("0.0,7", 3, "output_tokens must be a positive integer"),
])
def test_bad_csv_rows_name_file_and_line(tmp_path, row, line, message):
    path = tmp_path / "bad.csv"
    path.write_text(f"arrival_s,input_tokens,output_tokens\n0.0,1,1\n{row}\n")
    with pytest.raises(SpecError, match=message) as info:
        generate_requests(WorkloadSpec.parse({"trace": str(path)}))
    assert info.value.field == f"{path}:{line}"


@pytest.mark.parametrize("text,line,message", [
    ('{"arrival_s": 0, "input_tokens": 1, "output_tokens": 1}\n{"input_tokens": 3}\n',
     2, "output_tokens is required"),
    ('\n{"arrival_s": 0, "input_tokens": true, "output_tokens": 1}\n',
     2, "input_tokens must be a positive integer"),
    ('{"arrival_s": 0, "input_tokens": 1, "output_tokens": 1}\n{oops\n', 2, "not valid JSON"),
    ('[1, 2, 3]\n', 1, "must be a JSON object"),
    ('{"arrival_s": "soon", "input_tokens": 1, "output_tokens": 1}\n', 1, "arrival_s must be"),
])
def test_bad_jsonl_rows_name_file_and_line(tmp_path, text, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(text)
    with pytest.raises(SpecError, match=message) as info:
        generate_requests(WorkloadSpec.parse({"trace": str(path)}))
    assert info.value.field == f"{path}:{line}"


def test_bad_trace_files(tmp_path):
    with pytest.raises(SpecError, match="no such file"):
        generate_requests(WorkloadSpec.parse({"trace": "missing.csv"}), base_dir=tmp_path)
    (tmp_path / "t.txt").write_text("x")
    with pytest.raises(SpecError, match=r"\.csv or \.jsonl"):
        generate_requests(WorkloadSpec.parse({"trace": "t.txt"}), base_dir=tmp_path)
    (tmp_path / "h.csv").write_text("arrival_s,prompt_len,output_tokens\n0,1,1\n")
    with pytest.raises(SpecError, match="header must name input_tokens") as info:
        generate_requests(WorkloadSpec.parse({"trace": "h.csv"}), base_dir=tmp_path)
    assert info.value.field.endswith("h.csv:1")
    (tmp_path / "e.csv").write_text("arrival_s,input_tokens,output_tokens\n")
    with pytest.raises(SpecError, match="has no requests"):
        generate_requests(WorkloadSpec.parse({"trace": "e.csv"}), base_dir=tmp_path)
