"""`python -m simtune.cli`: the same app as the `simtune` script."""

from simtune.cli import app

app()
