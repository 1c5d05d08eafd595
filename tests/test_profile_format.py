"""The profile directory: write, load, use in a simulation; clear errors for bad directories."""

from __future__ import annotations

import json

import pytest

from profiler.store import ProfileStore
from simulator.errors import SpecError
from simulator.specs.catalog import load_cluster, load_model, load_plan
from simulator.specs.profile import META_FILE, ProfileError, apply_profile, load_profile
from simulator.training.simulate import simulate_training

CPU_FITS = {
    "gemm": {"bf16": {"flops_per_s": 2.5e11, "half_dim": 40.0, "overhead_s": 2e-5,
                      "cv_median_abs_error": 0.05, "samples": 10}},
    "memory": {"bytes_per_s": 4e9, "overhead_s": 8e-6, "cv_median_abs_error": 0.1, "samples": 10},
    "collectives": {"gloo": {"all_reduce": {"2": {"alpha_s": 1e-4, "bus_bytes_per_s": 2e9,
                                                  "cv_median_abs_error": 0.1, "samples": 5}}}},
}


def write_profile(root, fits=CPU_FITS):
    store = ProfileStore.open(root, "cpu", threads=1)
    table = store.table("gemm")
    table.add({"m": 64, "n": 64, "k": 64, "dtype": "bf16", "flops": 2 * 64**3, "bytes": 3 * 2 * 64 * 64,
               "median_s": 1e-5, "p10_s": 1e-5, "p90_s": 1.2e-5, "reps": 5})
    store.meta["fits"] = fits
    store.save_meta()
    return root


def test_round_trip_changes_the_prediction_and_names_its_source(tmp_path):
    root = write_profile(tmp_path / "prof")
    profile = load_profile(root)
    assert profile.tables["gemm"]["rows"] == 1 and profile.device["threads"] == 1
    assert len(profile.frame("gemm")) == 1
    model, plan = load_model("gpt-debug"), load_plan("debug")
    datasheet = load_cluster("2xcpu", profile="none")
    measured = load_cluster("2xcpu", profile=root)
    dev = measured.device
    assert dev.efficiency.gemm_max == pytest.approx(2.5e11 / dev.peak_flops)   # this CPU's datasheet peak
    assert dev.efficiency.gemm_overhead_us == pytest.approx(20.0)
    assert dev.efficiency.memory_bound == pytest.approx(4e9 / dev.hbm_bandwidth_bytes_per_s)
    assert measured.intra_node_bandwidth_GBps == pytest.approx(2.0)
    assert dev.source_of("gemm").startswith("measured") and dev.source_of("attention") == "datasheet"
    a = simulate_training(model, datasheet, plan)
    b = simulate_training(model, measured, plan)
    assert a.cost_sources["gemm"] == "datasheet" and b.cost_sources["gemm"].startswith("measured")
    assert a.iteration_time_s != pytest.approx(b.iteration_time_s, rel=1e-3)


def test_no_profile_changes_nothing_and_the_cpu_clusters_carry_the_committed_one():
    assert load_cluster("8xh100", profile="none") == load_cluster("8xh100")
    assert load_cluster("8xh100").device.sources() == {cost: "datasheet" for cost in load_cluster("8xh100").device.sources()}
    assert load_cluster("1xcpu").device.source_of("gemm").startswith("measured")
    datasheet = load_cluster("1xcpu", profile="none")
    assert datasheet.profile is None and datasheet.device.source_of("gemm") == "datasheet"


def test_a_cluster_spec_can_name_its_profile(tmp_path):
    root = write_profile(tmp_path / "prof")
    cluster = load_cluster({"name": "c", "device": "cpu", "num_nodes": 1, "devices_per_node": 2,
                            "intra_node_bandwidth_GBps": 5, "inter_node_bandwidth_GBps": 5, "profile": str(root)})
    assert cluster.device.source_of("gemm").startswith("measured")


def test_missing_corrupt_partial_and_version_mismatch_name_file_and_field(tmp_path):
    with pytest.raises(ProfileError, match="is not a directory"):
        load_profile(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ProfileError, match=r"profile\.json: file"):
        load_profile(tmp_path / "empty")
    root = write_profile(tmp_path / "prof")
    meta = json.loads((root / META_FILE).read_text())
    (root / META_FILE).write_text(json.dumps({**meta, "version": 99}))
    with pytest.raises(ProfileError, match=r"profile\.json: version = 99"):
        load_profile(root)
    (root / META_FILE).write_text("{not json")
    with pytest.raises(ProfileError, match="corrupt"):
        load_profile(root)
    (root / META_FILE).write_text(json.dumps(meta))
    (root / "gemm.csv").unlink()
    with pytest.raises(ProfileError, match=r"gemm\.csv: file = 'missing'.*partial"):
        load_profile(root)


def test_a_fit_above_the_datasheet_peak_is_an_error_not_a_clamp(tmp_path):
    fits = {"gemm": {"bf16": {"flops_per_s": 9e12, "half_dim": 0.0, "overhead_s": 0.0}}}
    root = write_profile(tmp_path / "prof", fits)
    with pytest.raises(ProfileError, match=r"fits\.gemm\.bf16\.flops_per_s.*exceeds"):
        apply_profile(load_cluster("1xcpu"), root)


def test_resume_refuses_another_thread_count_and_non_profile_directories(tmp_path):
    root = write_profile(tmp_path / "prof")
    with pytest.raises(ProfileError, match="device.threads"):
        ProfileStore.open(root, "cpu", threads=2)
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("x")
    with pytest.raises(ProfileError, match="not empty"):
        ProfileStore.open(other, "cpu", threads=1)
    assert isinstance(ProfileError(root, "f", 1, "x"), SpecError)


def test_cpu_ranks_take_the_datasheet_of_the_cpu_the_profile_measured():
    """Nxcpu is the cores of the machine that measured the profile: the committed profiles of
    the two development CPUs bring their own datasheets (an AMX Xeon's bf16 GEMMs run past the
    EPYC core's whole peak); a GPU cluster keeps its device."""
    assert load_cluster("2xcpu", profile="cpu-epyc-1t").device.name == "cpu"
    xeon = load_cluster("2xcpu", profile="cpu-xeon-1t").device
    assert xeon.name == "cpu-xeon" and "gemm" in xeon.cost_sources and xeon.efficiency.gemm_max <= 1.0
    assert load_cluster("2xcpu", profile="none").device.name == "cpu"
    assert load_cluster("8xh100", profile="cpu-xeon-1t").device.name == load_cluster("8xh100").device.name


def test_the_attention_curve_and_the_simple_op_rate_come_from_the_profile(tmp_path):
    """The measured prefill rate per length becomes the device's attention curve (doubled to the
    full-square convention, as the single rate is) with the kernel's block steps; add and mul
    per-op rates become the simple element-wise efficiency (their harmonic mean)."""
    fits = {**CPU_FITS,
            "attention": {"bf16": {"flops_per_s": 5e10, "diagonal_keys": 40.0, "cv_median_abs_error": 0.1,
                                   "samples": 10, "prefill_curve": [[128, 3e10], [512, 4e10], [1024, 5e10]],
                                   "q_block_steps": [192, 768]}},
            "memory": {**CPU_FITS["memory"], "by_op": {
                "add": {"by_dtype": {"bf16": {"bytes_per_s": 3e10, "overhead_s": 1e-6}}},
                "mul": {"by_dtype": {"bf16": {"bytes_per_s": 6e10, "overhead_s": 1e-6}}}}}}
    cluster = apply_profile(load_cluster("1xcpu"), write_profile(tmp_path / "p", fits))
    dev = cluster.device
    e = dev.efficiency
    assert [s for s, _ in e.attention_curve] == [128, 512, 1024]
    assert e.attention_curve[1][1] == pytest.approx(2 * 4e10 / dev.peak_flops)
    assert e.attention_steps == [192, 768]
    assert e.memory_bound_simple * dev.hbm_bandwidth_bytes_per_s == pytest.approx(4e10)   # 2 / (1/3 + 1/6) x 1e10


def test_an_attention_curve_above_the_peak_or_out_of_order_is_an_error(tmp_path):
    fits = {**CPU_FITS, "attention": {"bf16": {"flops_per_s": 5e10, "cv_median_abs_error": 0.1, "samples": 10,
                                               "prefill_curve": [[128, 1e20]]}}}
    with pytest.raises(ProfileError, match=r"prefill_curve\[128\]"):
        apply_profile(load_cluster("1xcpu"), write_profile(tmp_path / "p", fits))
    eff = load_cluster("1xcpu").device.efficiency.model_dump()
    with pytest.raises(SpecError, match="ascending"):
        type(load_cluster("1xcpu").device.efficiency).parse({**eff, "attention_curve": [[512, 0.1], [128, 0.1]]})
