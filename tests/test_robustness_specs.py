"""Every spec loader on any input: a spec, or a SpecError (a ValueError) that names the field.

Property tests (hypothesis): catalog entries of every kind with a field dropped, an unknown
field added, or a value replaced by an odd one (0, negative, 10**12, 10**30, NaN, infinities,
wrong types, huge lists), as a mapping and as a YAML file; random YAML text; random sweep
specs, profile directories and trace files. What is accepted is kept exactly (no silent clamp:
the loaded spec writes back the numbers it was given, and reads back equal). The `@example`s are
the inputs that once escaped as tracebacks. `make test` runs a few examples of each;
`make fuzz` many.
"""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import example, given
from hypothesis import strategies as st
from robustness_support import (
    assert_named_spec_error,
    mutate,
    odd_values,
    random_yaml_text,
    time_limit,
)

from simulator.errors import SpecError
from simulator.specs.catalog import KINDS, _entries, _load, read_yaml

BASES = {kind: [read_yaml(path) for path in _entries(kind).values()] for kind in KINDS}


def _numbers_kept(given: dict, loaded: dict) -> None:
    """Every finite number the input gave at the top level is in the loaded spec unchanged."""
    for key, value in given.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool) and key in loaded:
            assert loaded[key] == value, (key, value, loaded[key])


def _load_or_named_error(kind: str, ref) -> None:
    try:
        with time_limit(10):
            spec = _load(kind, ref, kind[:-1])
    except SpecError as e:
        assert_named_spec_error(e)
        return
    data = spec.to_dict()
    assert KINDS[kind].parse(data) == spec  # reads back equal
    if isinstance(ref, dict):
        _numbers_kept(ref, data)


@pytest.mark.parametrize("kind", sorted(KINDS))
@given(data=st.data())
def test_mutated_spec_mapping_loads_or_names_the_field(kind, data):
    base = data.draw(st.sampled_from(BASES[kind]))
    _load_or_named_error(kind, mutate(base, data))


# Inputs that once escaped the loaders: a device named '' (read the working directory as a
# file), integers beyond 64 bits (numpy overflow later), infinities (NaN reports), seeds < 0.
REGRESSIONS = [
    ("clusters", {"device": ""}),
    ("graphs", {"num_classes": 10**30}),
    ("graphs", {"seed": -1}),
    ("graphs", {"num_edges": 10**12}),
    ("workloads", {"seed": -1}),
    ("workloads", {"num_requests": 10**12}),
    ("models", {"num_layers": 10**12}),
    ("models", {"hidden_size": 10**30}),
    ("plans", {"global_batch_size": 10**12}),
    ("devices", {"memory_GiB": math.inf}),
    ("devices", {"peak_tflops": {"bf16": math.nan}}),
    ("clusters", {"inter_node_bandwidth_GBps": math.inf}),
]


@pytest.mark.parametrize(("kind", "change"), REGRESSIONS)
def test_regressions_are_named_errors(kind, change):
    base = BASES[kind][0]
    with pytest.raises(SpecError) as e:
        _load(kind, {**base, **change}, kind[:-1])
    assert_named_spec_error(e.value)
    assert list(change)[0] in e.value.field or list(change)[0] in str(e.value)


@pytest.mark.parametrize("kind", ["models", "clusters", "plans", "workloads", "graphs"])
@given(text=random_yaml_text)
@example(text="")
@example(text="- 1\n- 2")
@example(text="\x00")
def test_random_yaml_file_loads_or_names_the_field(kind, text, tmp_path_factory):
    path = tmp_path_factory.mktemp("yaml") / "spec.yaml"
    path.write_text(text, encoding="utf-8")
    _load_or_named_error(kind, str(path))


@pytest.mark.parametrize("content", [b"\xff\xfe\x00bad", b"name: \x80\x81"])
def test_binary_file_is_a_named_error(tmp_path, content):
    path = tmp_path / "model.yaml"
    path.write_bytes(content)
    with pytest.raises(SpecError) as e:
        _load("models", str(path), "model")
    assert str(path) in str(e.value)


def test_directory_is_a_named_error(tmp_path):
    (tmp_path / "dir.yaml").mkdir()
    for ref in (str(tmp_path), str(tmp_path / "dir.yaml")):
        with pytest.raises(SpecError, match="directory"):
            _load("models", ref, "model")


# --- sweep specs ---------------------------------------------------------------------------------


@given(data=st.data())
@example(data=None)
def test_sweep_spec_loads_or_names_the_field(data):
    from tuner.sweep.spec import load_sweep

    base = {"command": "simulate train", "options": {"plan": "debug"},
            "axes": {"model": ["gpt-debug"], "cluster": ["2xa100-80gb"]}}
    spec = base if data is None else mutate(base, data)
    try:
        with time_limit(10):
            load_sweep(spec)
    except SpecError as e:
        assert_named_spec_error(e)


@pytest.mark.parametrize("change", [{"command": []}, {"command": {"a": 1}}, {"axes": {"model": [[1]]}}])
def test_sweep_spec_regressions(change):
    from tuner.sweep.spec import load_sweep

    base = {"command": "simulate train", "options": {"plan": "debug"}, "axes": {"model": ["gpt-debug"]}}
    with pytest.raises(SpecError) as e:
        load_sweep({**base, **change})
    assert_named_spec_error(e.value)


# --- profile directories ---------------------------------------------------------------------


@given(meta=st.one_of(st.dictionaries(st.sampled_from(["format", "version", "device", "tables", "fits"]),
                                      odd_values, max_size=5),
                      st.text(max_size=40), odd_values))
@example(meta={"format": "simtune-profile", "version": 1, "device": {}, "tables": {}, "fits": {}})
def test_profile_directory_loads_or_names_the_field(meta, tmp_path_factory):
    from simulator.specs.profile import load_profile

    root = tmp_path_factory.mktemp("profile")
    (root / "profile.json").write_text(meta if isinstance(meta, str) else json.dumps(meta), encoding="utf-8")
    try:
        load_profile(root)
    except SpecError as e:
        assert str(root) in str(e)


def test_profile_json_not_text_is_a_named_error(tmp_path):
    from simulator.specs.profile import load_profile

    (tmp_path / "profile.json").write_bytes(b"\xff\xfe{")
    with pytest.raises(SpecError):
        load_profile(tmp_path)


# --- traces: prompt traces, serving workload traces, acceptance traces --------------------------

json_lines = st.lists(st.one_of(
    st.dictionaries(st.sampled_from(["type", "id", "function", "path", "key", "messages", "submitted",
                                     "started", "ended", "name", "start", "end", "parent", "deps"]),
                    st.one_of(odd_values, st.sampled_from(["run", "call_start", "call", "function",
                                                                          "function_end", "tool"])),
                    max_size=8).map(json.dumps),
    st.text(max_size=30),
    st.just('{"type": "run"}'),
), max_size=6).map("\n".join)


@given(text=json_lines)
@example(text='{"type": "run"}\n[1, 2]\n{"type": "run"}')
@example(text='{"type": "run"}\n{"type": "call_start"}')
@example(text='{"type": "run"}\n{"type": "function", "id": "f1"}')
@example(text='not json\n{"type": "run"}')
def test_prompt_trace_reads_or_names_the_line(text, tmp_path_factory):
    from executor.prompts.trace import read_trace
    from simulator.workflows import dag_from_trace

    path = tmp_path_factory.mktemp("trace") / "run.jsonl"
    path.write_text(text, encoding="utf-8")
    for read in (read_trace, dag_from_trace):
        try:
            with time_limit(10):
                read(path)
        except SpecError as e:
            assert str(path) in str(e), str(e)


@given(rows=st.lists(st.dictionaries(st.sampled_from(["arrival_s", "input_tokens", "output_tokens"]),
                                     odd_values, max_size=3), max_size=5),
       suffix=st.sampled_from([".csv", ".jsonl"]))
@example(rows=[{"arrival_s": 0, "input_tokens": 10**30, "output_tokens": 1}], suffix=".jsonl")
def test_workload_trace_reads_or_names_the_row(rows, suffix, tmp_path_factory):
    import csv

    from simulator.serving.workload import generate_requests
    from simulator.specs import WorkloadSpec

    path = tmp_path_factory.mktemp("wl") / f"trace{suffix}"
    if suffix == ".jsonl":
        path.write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    else:
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, ["arrival_s", "input_tokens", "output_tokens"])
            writer.writeheader()
            writer.writerows(rows)
    try:
        with time_limit(10):
            generate_requests(WorkloadSpec.parse({"trace": str(path), "num_requests": 5}))
    except SpecError as e:
        assert_named_spec_error(e)


@given(text=st.one_of(st.text(max_size=60), odd_values.map(json.dumps)),
       suffix=st.sampled_from([".csv", ".json"]))
@example(text="acceptance\nabc\n", suffix=".csv")
@example(text="acceptance\n0.5\n\n1e999", suffix=".csv")
@example(text='{"classes": 3}', suffix=".json")
def test_acceptance_trace_reads_or_names_the_field(text, suffix, tmp_path_factory):
    from tuner.speculation import read_acceptance_trace

    path = tmp_path_factory.mktemp("acc") / f"acceptance{suffix}"
    path.write_text(text, encoding="utf-8")
    try:
        read_acceptance_trace(path)
    except SpecError as e:
        assert_named_spec_error(e)

