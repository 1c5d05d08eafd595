"""The benchmarks' shared plumbing that a number depends on: the CPU time stolen by a hypervisor."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import common  # noqa: E402


def test_stolen_share_is_steal_over_the_time_the_cores_wanted():
    before = {"busy": 100, "idle": 50, "steal": 10}
    assert common.stolen_share(before, {"busy": 190, "idle": 900, "steal": 20}) == 10 / 100   # idle time does not count
    assert common.stolen_share(before, {"busy": 100, "idle": 60, "steal": 10}) is None        # nothing ran
    assert common.stolen_share(None, before) is None


def test_cpu_times_reads_this_machine():
    times = common.cpu_times()
    if Path("/proc/stat").exists():
        assert set(times) == {"busy", "idle", "steal"} and all(v >= 0 for v in times.values())
        later = common.cpu_times()
        assert later["busy"] + later["idle"] >= times["busy"] + times["idle"]
    else:
        assert times is None
