"""Every `simtune` command on any input: a report (exit 0) or `error: ...` (exit 2), never a
traceback, never a hang (each call runs in-process under a time limit, `run_cli`).

Property tests (hypothesis): each command with one of its spec files mutated (a field dropped,
added, or given an odd value), and with odd option values (0, negative, 10**12, NaN, inf, text,
empty). `run train` and `serve` are checked as far as their argument validation: the step that
would start ranks or a server is replaced by a stub that stops the command. The `@example`s are
inputs that once escaped as tracebacks or hangs.
"""

from __future__ import annotations

import json

import pytest
from hypothesis import example, given
from hypothesis import strategies as st
from robustness_support import assert_report_or_named_error, dump_yaml, examples, mutate, run_cli

from simulator.specs.catalog import _entries, read_yaml

# command -> (fixed arguments, {spec option: (catalog kind, catalog name)})
COMMANDS = {
    "simulate train": (["--json"], {"-m": ("models", "gpt-debug"), "-c": ("clusters", "2xa100-80gb"),
                                    "-p": ("plans", "debug")}),
    "simulate serve": (["--json"], {"-m": ("models", "gpt-debug"), "-c": ("clusters", "1xa100-80gb"),
                                    "-d": ("deployments", "vllm-tp1"), "-w": ("workloads", "fixed-128-128")}),
    "simulate gnn": (["--json"], {"-g": ("graphs", "community-20k"), "-m": ("gnn_models", "graphsage-3"),
                                  "-c": ("clusters", "m5n-24xlarge"), "-p": ("gnn_plans", "distdgl-default")}),
    "tune train": (["-b", "8", "--no-baselines", "--json"], {"-m": ("models", "gpt-debug"),
                                                            "-c": ("clusters", "2xa100-80gb")}),
    "tune serve": (["--screen-requests", "20", "--json"], {"-m": ("models", "gpt-debug"),
                                                          "-c": ("clusters", "1xa100-80gb"),
                                                          "-w": ("workloads", "fixed-128-128")}),
    "tune spec": (["--acceptance", "0.7", "--batch-sizes", "1,2", "--json"],
                  {"--target": ("models", "llama-3-8b"), "--draft": ("models", "llama-3.2-1b"),
                   "-c": ("clusters", "1xa100-80gb")}),
    "partition": (["-n", "2", "--json"], {"-g": ("graphs", "community-20k")}),
    "run train": (["--json"], {"-m": ("models", "gpt-debug"), "-c": ("clusters", "2xcpu"), "-p": ("plans", "debug")}),
    "serve": ([], {"-d": ("deployments", "vllm-tp1")}),
}


class Reached(BaseException):
    """The command got past its argument checks to the step that would run ranks or a server."""


@pytest.fixture(autouse=True)
def _no_ranks_no_server(monkeypatch):
    """`run train` and `serve` stop where they would start ranks or listen (exit 0 here)."""
    import executor.training.run as run
    from executor.serving import server

    def reached(*args, **kwargs):
        raise Reached

    monkeypatch.setattr(run, "_measure", reached)
    monkeypatch.setattr(run, "_dry_run", reached)
    monkeypatch.setattr(server, "serve_forever", reached)


def _argv(command: str, replaced: dict[str, str] | None = None, extra: list[str] = ()) -> list[str]:
    fixed, specs = COMMANDS[command]
    replaced = replaced or {}
    argv = [*command.split(), *fixed, *extra]
    for flag, (_, name) in specs.items():
        argv += [flag, replaced.get(flag, name)]
    return argv


def _check(argv: list[str], timeout_s: float = 30.0) -> None:
    try:
        r = run_cli(argv, timeout_s)
    except Reached:
        return
    assert_report_or_named_error(r, argv)
    if r.code == 0 and "--json" in argv:
        json.loads(r.stdout)  # exactly one JSON object


@pytest.mark.parametrize("command", sorted(COMMANDS))
@examples(8)
@given(data=st.data())
def test_mutated_spec_file(command, data, tmp_path_factory):
    _, specs = COMMANDS[command]
    flag = data.draw(st.sampled_from(sorted(specs)))
    kind, name = specs[flag]
    spec = mutate(read_yaml(_entries(kind)[name]), data)
    path = tmp_path_factory.mktemp("spec") / f"{kind}.yaml"
    path.write_text(dump_yaml(spec), encoding="utf-8")
    _check(_argv(command, {flag: str(path)}))


ODD_TEXT = ["0", "-1", "1000000000000", "99999999999999999999999", "1e999", "nan", "inf", "-inf", "abc", "",
            "0.5", "1,2", "/", "/nonexistent/x.yaml"]
odd_text = st.one_of(st.sampled_from(ODD_TEXT), st.text(max_size=10))

# command -> options whose values are drawn
OPTIONS = {
    "simulate train": ["--profile", "-c", "-p"],
    "simulate serve": ["--profile", "-w"],
    "tune train": ["-b", "--seq-length", "--emit", "-c"],
    "tune serve": ["--screen-requests", "--emit"],
    "tune spec": ["--acceptance", "--batch-sizes", "--k-max", "--context", "--tp", "--engine", "--workload"],
    "partition": ["-n", "--method", "--seed", "--emit"],
    "run train": ["--steps", "--warmup", "--dtype", "-c"],
    "serve": ["--port", "--max-num-seqs", "--scheduler", "--num-blocks", "--max-model-len", "--max-queue",
              "--dtype", "-m"],
}


@pytest.mark.parametrize("command", sorted(OPTIONS))
@examples(10)
@given(data=st.data())
@example(data=None)
def test_odd_option_values(command, data):
    if data is None:
        _check(_argv(command))  # the command's own defaults
        return
    option = data.draw(st.sampled_from(OPTIONS[command]))
    value = data.draw(odd_text)
    specs = COMMANDS[command][1]
    if option in specs:
        _check(_argv(command, {option: value}))
    else:
        if command == "tune spec" and option == "--acceptance":
            argv = [a for a in _argv(command) if a not in ("--acceptance", "0.7")]
            _check([*argv, option, value])
            return
        _check(_argv(command, extra=[option, value]))


# Inputs that once escaped the CLI (now named errors): a device named '' in a cluster file, a
# cluster of 10**20 nodes (the tuner's divisor search would not end), a global batch of 10**12
# (10**12 micro-batches as simulation events), a graph spec of 10**12 edges or classes.
@pytest.mark.parametrize("argv", [
    ["tune", "train", "-m", "gpt-debug", "-c", "99999999999999999999x8xa100-80gb", "-b", "8", "--no-baselines"],
    ["tune", "train", "-m", "gpt-debug", "-c", "2xa100-80gb", "-b", "1000000000000", "--no-baselines"],
    ["simulate", "train", "-m", "gpt-debug", "-c", "5000xcpu", "-p", "debug"],
    ["partition", "-g", "community-20k", "-n", "1000000000000"],
    ["tune", "spec", "--target", "llama-3-8b", "--draft", "llama-3.2-1b", "-c", "1xa100-80gb", "--acceptance", "nan"],
    ["tune", "spec", "--target", "llama-3-8b", "--draft", "llama-3.2-1b", "-c", "1xa100-80gb", "--acceptance", "0.7",
     "--tp", "1000000000000"],
    ["simulate", "train", "-m", "gpt-debug", "-c", "2xa100-80gb", "-p", "debug", "--profile", ""],
    ["tune", "spec", "--target", "llama-3-8b", "--draft", "llama-3.2-1b", "-c", "1xa100-80gb", "--acceptance", "0.7",
     "--plot", "/tmp/simtune-robustness-plot.json"],
    ["partition", "-g", "community-20k", "-n", "2", "--seed", "99999999999999999999999"],
    ["simulate", "train", "-m", "gpt-debug", "-c", "2xa100-80gb", "-p", "debug", "--profile", "\x00"],
    ["simulate", "train", "-m", "gpt-debug\x00", "-c", "2xa100-80gb", "-p", "debug"],
])
def test_regressions(argv):
    r = run_cli(argv, 30)
    assert r.code == 2 and r.stderr.startswith(("error:", "Usage:")), (r.code, r.stderr)  # ours, or click's


@pytest.mark.parametrize(("kind", "name", "change", "argv"), [
    ("clusters", "2xa100-80gb", {"device": ""}, ["simulate", "train", "-m", "gpt-debug", "-p", "debug", "-c"]),
    ("models", "gpt-debug", {"num_layers": 10**12}, ["simulate", "train", "-c", "2xa100-80gb", "-p", "debug", "-m"]),
    ("plans", "debug", {"global_batch_size": 10**12}, ["simulate", "train", "-m", "gpt-debug", "-c", "2xa100-80gb",
                                                       "-p"]),
    ("workloads", "fixed-128-128", {"num_requests": 10**12},
     ["simulate", "serve", "-m", "gpt-debug", "-c", "1xa100-80gb", "-d", "vllm-tp1", "-w"]),
    ("graphs", "community-20k", {"num_edges": 10**12}, ["partition", "-n", "2", "-g"]),
    ("graphs", "community-20k", {"num_nodes": 10**12}, ["partition", "-n", "2", "-g"]),
    ("graphs", "community-20k", {"num_classes": 10**12}, ["partition", "-n", "2", "-g"]),
    ("graphs", "community-20k", {"feature_dim": 10**12}, ["partition", "-n", "2", "-g"]),
    ("graphs", "community-20k", {"seed": -1}, ["partition", "-n", "2", "-g"]),
])
def test_spec_regressions(kind, name, change, argv, tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_text(dump_yaml({**read_yaml(_entries(kind)[name]), **change}))
    r = run_cli([*argv, str(path)], 30)
    assert r.code == 2 and r.stderr.startswith("error:"), (r.code, r.stderr)
    assert list(change)[0] in r.stderr


def test_graph_without_features_is_simulated(tmp_path):
    """feature_dim 0 (and no embedding): the first layer has no GEMM to time (was 0 / 0)."""
    path = tmp_path / "graph.yaml"
    path.write_text(dump_yaml({**read_yaml(_entries("graphs")["community-20k"]), "feature_dim": 0}))
    r = run_cli(["simulate", "gnn", "-g", str(path), "-m", "graphsage-3", "-c", "m5n-24xlarge", "-p",
                 "distdgl-default", "--json"], 30)
    assert r.code == 0, r.stderr
    assert json.loads(r.stdout)["epoch_time_s"] > 0


# --- commands over files: sweep specs, prompt traces, profile directories ----------------------


@examples(10)
@given(data=st.data())
@example(data=None)  # every scenario fails (plan: null): the summary ranks no rows (was a KeyError)
def test_sweep_spec_file(data, tmp_path_factory):
    base = {"command": "simulate train", "options": {"plan": "debug"},
            "axes": {"model": ["gpt-debug"], "cluster": ["2xa100-80gb"]}}
    spec = {**base, "options": {"plan": None}} if data is None else mutate(base, data)
    folder = tmp_path_factory.mktemp("sweep")
    (folder / "sweep.yaml").write_text(dump_yaml(spec), encoding="utf-8")
    _check(["sweep", str(folder / "sweep.yaml"), "--out", str(folder / "out"), "--workers", "1", "--json"], 60)


TRACE = ('{"type": "run", "backend": "fake"}\n'
         '{"type": "call_start", "id": "c1", "path": "main/c1", "key": "k", "messages": [], "submitted": 0.0}\n'
         '{"type": "call", "id": "c1", "started": 0.0, "ended": 1.0, "response": "hi"}\n')


@examples(15)
@given(line=st.one_of(st.text(max_size=40), st.dictionaries(
    st.sampled_from(["type", "id", "submitted", "ended", "started", "messages", "start", "name", "path"]),
    st.one_of(st.sampled_from(["call", "call_start", "function", "run", "c1"]), st.floats(), st.none(),
              st.integers(), st.lists(st.integers(), max_size=2)), max_size=6).map(json.dumps)),
       where=st.integers(0, 3))
@example(line='{"type": "call", "id": "c1", "ended": "soon"}', where=3)
@example(line="[1, 2]", where=1)
def test_prompt_trace_commands(line, where, tmp_path_factory):
    lines = TRACE.splitlines()
    lines.insert(where, line)
    path = tmp_path_factory.mktemp("trace") / "run.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    _check(["trace", "show", str(path), "--json"])
    _check(["trace", "show", str(path)])
    _check(["simulate", "workflow", str(path), "--json"])


@examples(10)
@given(meta=st.one_of(st.text(max_size=30), st.dictionaries(
    st.sampled_from(["format", "version", "device", "tables", "fits"]),
    st.one_of(st.just("simtune-profile"), st.just(1), st.none(), st.dictionaries(st.text(max_size=5), st.integers(),
                                                                                 max_size=2)),
    max_size=5).map(json.dumps)))
def test_profile_report_of_any_directory(meta, tmp_path_factory):
    root = tmp_path_factory.mktemp("profile")
    (root / "profile.json").write_text(meta, encoding="utf-8")
    _check(["profile", "--report", str(root), "--json"])
    _check(["simulate", "train", "-m", "gpt-debug", "-c", "2xa100-80gb", "-p", "debug", "--profile", str(root)])


@pytest.mark.parametrize("argv", [
    ["catalog", "--kind", "nope"], ["catalog", "--json"], ["profile"], ["profile", "--ops", "nope", "--out", ""],
    ["sweep", "/nonexistent.yaml"], ["sweep", "--report", "/nonexistent"], ["trace", "show", "/nonexistent.jsonl"],
    ["simulate", "workflow", "/nonexistent.jsonl"], ["tune", "gnn", "-g", "community-20k", "-m", "graphsage-3",
                                                    "-c", "2xm5n-24xlarge", "--max-global-batch", "0"],
    ["tune", "gnn", "-g", "nope", "-m", "graphsage-3", "-c", "2xm5n-24xlarge"],
    ["tune", "gnn", "-g", "community-20k", "-m", "graphsage-3", "-c", "2xm5n-24xlarge", "--emit", "nope"],
    ["run", "gnn", "--help"], ["validate", "train", "--nope"], ["simulate", "gnn", "-g", "", "-m", "graphsage-3",
                                                                "-c", "m5n-24xlarge", "-p", "distdgl-default"],
])
def test_other_entries(argv):
    _check(argv)
