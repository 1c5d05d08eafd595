"""What-if sweeps: many scenarios of one command (a cross product of catalog names, YAML paths
and numbers), run in this process, on a process pool or on Ray, into one Parquet table.

`spec` (the sweep spec and its scenarios), `where` (the filter language), `commands` (each
command as an in-process call), `runner` (backends and the streaming table), `table` (the
table's file format), `analysis` (ranking, best per group, Pareto front, plots).
"""

from tuner.sweep.runner import STATUSES, SweepResult, run_scenario, run_sweep
from tuner.sweep.spec import Scenario, SweepSpec, load_sweep, parse_sweep
from tuner.sweep.table import read_sweep

__all__ = ["STATUSES", "Scenario", "SweepResult", "SweepSpec", "load_sweep", "parse_sweep", "read_sweep",
           "run_scenario", "run_sweep"]
