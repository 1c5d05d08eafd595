"""The command groups (`simulate`, `tune`, `validate`, `run`) the verb modules register on.

They live apart from `simtune.cli` so that `train.py`, `serve.py`, `spec.py` and
`validate.py` and `run.py` can add their commands without importing the package that imports them.
"""

from __future__ import annotations

import typer

simulate_app = typer.Typer(
    help="Predict one run of a workload from its specs.", no_args_is_help=True
)
validate_app = typer.Typer(
    help="Compare predictions with published measurements.", no_args_is_help=True
)
tune_app = typer.Typer(help="Search for the fastest plan that fits.", no_args_is_help=True)
run_app = typer.Typer(
    help="Run a plan on this machine's devices and measure it.", no_args_is_help=True
)
