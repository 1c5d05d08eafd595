"""simtune's command line: `catalog`, `profile`, `partition`, `simulate train|serve|gnn|workflow`,
`tune train|serve|spec|gnn`, `validate train|serve|gnn`, `run train|gnn`, `trace show`.

Every spec argument takes a catalog name (`gpt3-175b`, `16x8xa100-80gb`) or a path to a YAML
file of the same schema. Human output is rich tables on stdout. With `--json` a command prints
exactly one JSON object on stdout and nothing else; notes and errors always go to stderr.
Input errors (`SpecError`, `InfeasiblePlan`, a missing file) print `error: ...` and exit 2,
like click's own usage errors, so scripts can tell them from a failed `--strict` check (1).

One module per workload (`train`, `serve`, `spec`, `validate`, `catalog`, `profile`, `run`), each a thin layer
(parse, load specs, call one package function, render) over the shared `render` module.
Importing a verb module registers its commands on the groups of `apps`, so the import order
below is the order `--help` lists them in.
"""

from __future__ import annotations

import typer

# Importing a verb module registers its commands. `train` goes first (kept apart from the
# sorted imports below) because `--help` lists the commands of a group in registration order:
# train, serve, spec.
from simtune.cli import train  # noqa: F401

# isort: split
from simtune.cli import run, run_gnn, serve, spec, validate  # noqa: F401
from simtune.cli.apps import run_app, simulate_app, tune_app, validate_app
from simtune.cli.catalog import catalog
from simtune.cli.gnn import partition
from simtune.cli.profile import profile
from simtune.cli.render import fmt_seconds, to_jsonable
from simtune.cli.server import serve as serve_http

# isort: split
from simtune.cli import gnn_sim  # noqa: F401  (simulate, tune and validate gnn)
from simtune.cli.workflow import trace_app  # also registers `simulate workflow`

app = typer.Typer(
    help="Simulation-first performance modeling for distributed LLM training and serving.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)
app.add_typer(simulate_app, name="simulate")
app.add_typer(tune_app, name="tune")
app.add_typer(validate_app, name="validate")
app.add_typer(run_app, name="run")
app.add_typer(trace_app, name="trace")
app.command()(catalog)
app.command()(profile)
app.command()(partition)
app.command("serve")(serve_http)
from simtune.cli import sweep as _sweep  # noqa: E402,F401  (registers `simtune sweep` on app)

__all__ = ["app", "fmt_seconds", "to_jsonable"]
