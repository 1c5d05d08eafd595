"""`simtune run gnn`: train a GNN for real on this machine's CPU ranks (one per part) and print
what it measured, beside the simulator's prediction on `Nxcpu` with `--compare`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from simtune.cli.apps import run_app
from simtune.cli.render import (
    JsonFlag,
    ProfileOption,
    _table,
    err,
    fmt_seconds,
    handles_errors,
    out,
    print_json,
)

PARTS = ("sample", "fetch_local", "fetch_remote", "compute", "allreduce", "stall")


def _error(measured: float | None, predicted: float | None) -> str:
    if measured is None or not predicted:
        return ""
    return f"{measured / predicted - 1:+.1%}"


def _times(r: Any) -> Table:
    compare = r.predicted_epoch_time_s is not None
    headers = ("part", "measured", "% of epoch") + (("predicted", "error") if compare else ())
    table = _table(None, *headers)
    rows = [("epoch", r.epoch_time_s, r.predicted_epoch_time_s),
            ("iteration", r.iteration_time_s, r.predicted_iteration_time_s)]
    rows += [(k, r.breakdown.get(k, 0.0), r.predicted_breakdown.get(k)) for k in PARTS]
    for name, measured, predicted in rows:
        share = f"{measured / r.epoch_time_s:.1%}" if name in PARTS and r.epoch_time_s else ""
        cells = [name, fmt_seconds(measured), share]
        if compare:
            cells += ["-" if predicted is None else fmt_seconds(predicted),
                      _error(measured, predicted) if name in ("epoch", "iteration") else ""]
        table.add_row(*cells)
    return table


def _epochs(r: Any) -> Table:
    table = _table("per epoch", "epoch", "time", "loss", "val acc", "test acc")
    for e, seconds in enumerate(r.epoch_times_s):
        val, test = r.val_accuracy[e] if r.val_accuracy else None, r.test_accuracy[e] if r.test_accuracy else None
        table.add_row(str(e + 1), fmt_seconds(seconds), f"{r.losses[e]:.4f}",
                      "-" if val is None else f"{val:.3f}", "-" if test is None else f"{test:.3f}")
    return table


def _render(r: Any) -> None:
    p = r.partition
    out.print(f"[bold]{escape(r.model)}[/] on [bold]{escape(r.graph)}[/]: {r.nproc} gloo ranks (one per part, "
              f"one thread each), {r.epochs} epochs of {r.iterations_per_epoch} iterations")
    out.print(escape(f"partition {p['method']}: edge cut {p['edge_cut_fraction']:.1%}, halo nodes per part "
                     f"{p['halo_nodes']}, balance {p['balance']}"), soft_wrap=True)
    if r.profile is not None or r.predicted_epoch_time_s is not None:
        out.print(escape(f"predicted for {r.cluster} with profile {r.profile or 'datasheet'}"))
    out.print(_times(r))
    out.print(f"remote feature bytes per epoch: {r.remote_bytes_per_epoch / 1e6:,.2f} MB "
              f"({r.remote_rows_per_epoch:,.0f} rows); sampling requests: {r.sampling_bytes_per_epoch / 1e6:,.2f} MB; "
              f"input nodes per batch: {r.input_nodes_per_batch:,.0f}")
    if r.predicted_remote_bytes_per_epoch is not None:
        out.print(f"predicted remote bytes per epoch: {r.predicted_remote_bytes_per_epoch / 1e6:,.2f} MB")
    out.print(_epochs(r))
    out.print("core share per rank (CPU time / wall time of the timed epochs): "
              + ", ".join(f"{c:.0%}" for c in r.core_share))
    if r.core_share and min(r.core_share) < 0.8:
        err.print(f"note: a rank ran on {min(r.core_share):.0%} of a core: the machine's cores were shared with other "
                  "work, or ranks waited on each other; times are not those of dedicated cores", soft_wrap=True)
    for note in r.notes:
        err.print(escape(f"note: {note}"), soft_wrap=True)


@run_app.command("gnn")
@handles_errors
def run_gnn_command(
    graph: Annotated[str, typer.Option("--graph", "-g", help="Graph: catalog name or YAML path.")],
    model: Annotated[str, typer.Option("--model", "-m", help="GNN model: catalog name or YAML path.")],
    plan: Annotated[str, typer.Option("--plan", "-p", help="GNN plan: catalog name or YAML path.")],
    nproc: Annotated[int, typer.Option("--nproc", "-n", help="Trainer ranks (one per part).")],
    epochs: Annotated[int, typer.Option(min=1, help="Epochs (the first is not in the median).")] = 3,
    partition_dir: Annotated[Path | None, typer.Option(
        "--partition-dir", metavar="DIR",
        help="Partition store from `simtune partition --out DIR` (nproc parts); default: "
        "partition now with the plan's method.")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the weights, sampling and partitioning.")] = 0,
    profile: ProfileOption = None,
    compare: Annotated[bool, typer.Option("--compare", help="Also predict the epoch on Nxcpu with the simulator.")] = False,
    as_json: JsonFlag = False,
) -> None:
    """Train a GNN on this machine's CPU ranks and measure each epoch."""
    from executor.gnn.run import run_gnn  # torch only for this command
    from profiler.ranks import RankError

    try:
        report = run_gnn(graph, model, plan, nproc, epochs=epochs, seed=seed, partition_dir=partition_dir,
                         compare=compare, profile=profile)
    except (RankError, TimeoutError) as e:
        err.print(Text(f"error: {e}", style="bold red"), soft_wrap=True)
        raise typer.Exit(1) from None
    if as_json:
        print_json(report.to_dict())
        return
    _render(report)
