"""Outputs are written atomically: an unwritable path or a full disk is `error: ...` (exit 2)
naming the path, the previous file stays as it was, and no half-written or temporary file is
left behind.

Every writer goes through `simulator.files.atomic_path` (the partition store through its own
temporary directory): Chrome traces of `simulate train|serve|gnn` and `trace show --chrome`,
launch files of `tune train|serve --emit`, figures (`tune spec --plot`, `profile --report
--plot`), sweep tables and partition stores. The tests run as root here, where a read-only
folder is still writable, so an unwritable path is a folder under a regular file; a full disk
is ENOSPC raised where the written bytes reach the disk (fsync, and the chmod after a
binary writer).
"""

from __future__ import annotations

import errno
import os

import numpy as np
import pytest
from robustness_support import run_cli

SIM_TRAIN = ["simulate", "train", "-m", "gpt-debug", "-c", "2xa100-80gb", "-p", "debug"]
TRACE_FILE = ('{"type": "run", "backend": "fake"}\n'
              '{"type": "call_start", "id": "c1", "path": "main/c1", "key": "k", "messages": [], "submitted": 0.0}\n'
              '{"type": "call", "id": "c1", "started": 0.0, "ended": 1.0, "response": "hi"}\n')

# name -> (argv before the output path, the option that takes it, what the path is: file or folder)
WRITERS = {
    "chrome trace (train)": ([*SIM_TRAIN, "--trace"], "file"),
    "chrome trace (serve)": (["simulate", "serve", "-m", "gpt-debug", "-c", "1xa100-80gb", "-d", "vllm-tp1",
                              "-w", "fixed-128-128", "--trace"], "file"),
    "chrome trace (gnn)": (["simulate", "gnn", "-g", "community-20k", "-m", "graphsage-3", "-c", "m5n-24xlarge",
                            "-p", "distdgl-default", "--trace"], "file"),
    "prompt trace export": (["trace", "show", "{trace}", "--chrome"], "file"),
    "launch files (train)": (["tune", "train", "-m", "gpt-debug", "-c", "2xa100-80gb", "-b", "8", "--no-baselines",
                              "--emit", "torchrun", "--out"], "folder"),
    "launch files (serve)": (["tune", "serve", "-m", "gpt-debug", "-c", "1xa100-80gb", "-w", "fixed-128-128",
                              "--screen-requests", "10", "--emit", "vllm", "--out"], "folder"),
    "figure (tune spec)": (["tune", "spec", "--target", "llama-3-8b", "--draft", "llama-3.2-1b", "-c", "1xa100-80gb",
                            "--acceptance", "0.7", "--batch-sizes", "1,2", "--plot"], "file"),
    "partition store": (["partition", "-g", "community-20k", "-n", "2", "--out"], "folder"),
    "sweep table": (["sweep", "{sweep}", "--workers", "1", "--out"], "folder"),
}


def _argv(name: str, target, tmp_path) -> list[str]:
    trace = tmp_path / "inputs" / "run.jsonl"
    sweep = tmp_path / "inputs" / "sweep.yaml"
    trace.parent.mkdir(exist_ok=True)
    trace.write_text(TRACE_FILE)
    sweep.write_text("command: simulate train\noptions: {plan: debug, cluster: 2xa100-80gb}\n"
                     "axes: {model: [gpt-debug]}\n")
    argv, _ = WRITERS[name]
    return [a.format(trace=trace, sweep=sweep) for a in argv] + [str(target)]


def _files(root) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if "inputs" not in p.parts}


@pytest.mark.parametrize("name", sorted(WRITERS))
def test_unwritable_path_is_a_named_error_and_writes_nothing(name, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    target = blocker / "out" / ("result" if WRITERS[name][1] == "folder" else "result.json")
    r = run_cli(_argv(name, target, tmp_path), 60)
    assert r.code == 2, (r.code, r.stderr)
    assert r.stderr.startswith("error:") and str(blocker) in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    assert _files(tmp_path) == {"a-file"}
    assert blocker.read_text() == "not a folder"


@pytest.fixture
def full_disk(monkeypatch):
    """ENOSPC where written bytes reach the disk: fsync (text), the chmod after a binary writer,
    and numpy's save (the partition store's arrays)."""

    def enospc(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    real_save = np.save

    def save_half(file, arr, *args, **kwargs):
        real_save(file, np.asarray(arr)[: len(arr) // 2] if np.ndim(arr) else arr)  # some bytes written ...
        enospc()                                                                   # ... then the disk is full

    monkeypatch.setattr(os, "fsync", enospc)
    monkeypatch.setattr(os, "chmod", enospc)
    monkeypatch.setattr(np, "save", save_half)


@pytest.mark.parametrize("name", sorted(WRITERS))
def test_full_disk_keeps_the_previous_output(name, tmp_path, full_disk):
    kind = WRITERS[name][1]
    target = tmp_path / ("result" if kind == "folder" else "result.png" if "figure" in name else "result.json")
    previous = target / ("partition.json" if "partition" in name else "previous.txt") if kind == "folder" else target
    previous.parent.mkdir(parents=True, exist_ok=True)
    previous.write_text("the previous output")
    before = _files(tmp_path)
    r = run_cli(_argv(name, target, tmp_path), 60)
    assert r.code == 2, (r.code, r.stderr)
    assert r.stderr.startswith("error:") and "No space left on device" in r.stderr, r.stderr
    assert str(tmp_path) in r.stderr  # names the output
    assert previous.read_text() == "the previous output"
    assert _files(tmp_path) == before  # no temporary or half-written file


def test_write_text_atomic_names_the_target(tmp_path, full_disk):
    from simulator.files import write_text_atomic

    target = tmp_path / "x.json"
    with pytest.raises(OSError) as e:
        write_text_atomic(target, "{}")
    assert e.value.filename == str(target) and e.value.errno == errno.ENOSPC
    assert list(tmp_path.iterdir()) == []
