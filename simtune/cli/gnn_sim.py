"""`simtune simulate gnn`, `simtune tune gnn` and `simtune validate gnn`: one predicted epoch of
distributed GNN training, the search for the fastest plan (with `--emit dgl`, its launch files),
and the predictions next to DistDGL's published figures."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from simtune.cli.apps import simulate_app, tune_app, validate_app
from simtune.cli.render import (
    EXIT_CHECK_FAILED,
    JsonFlag,
    SearchProgress,
    StrictFlag,
    _table,
    err,
    fmt_number,
    fmt_seconds,
    handles_errors,
    out,
    print_json,
)
from simulator.errors import SpecError
from simulator.files import write_text_atomic

GraphOption = Annotated[str, typer.Option("--graph", "-g", help="Graph: catalog name or YAML path.")]
GnnModelOption = Annotated[str, typer.Option("--model", "-m", help="GNN model: catalog name or YAML path.")]
GnnClusterOption = Annotated[str, typer.Option("--cluster", "-c", help="Cluster: name, NxNODE or YAML.")]


def _plan_summary(p: Any) -> str:
    parts = [p.partition, f"{p.trainers_per_machine} trainers x {p.samplers_per_trainer} samplers per machine",
             f"{p.batch_size_per_trainer} seeds per trainer", f"features {p.feature_placement}"]
    if p.feature_cache_fraction:
        parts.append(f"cache {p.feature_cache_fraction:g} of the halo")
    if p.pipeline_fetch:
        parts.append("fetch pipelined")
    return " · ".join(parts + [p.feature_dtype])


def _headline(r: Any) -> Table:
    table = _table(None, "metric", "value")
    table.add_row("epoch time", fmt_seconds(r.epoch_time_s))
    table.add_row("iteration time (slowest machine)", fmt_seconds(r.iteration_time_s))
    table.add_row("iterations per epoch", f"{r.iterations_per_epoch:,}")
    table.add_row("seeds/s", f"{r.seeds_per_s:,.0f}")
    table.add_row("remote bytes per epoch", f"{r.remote_bytes_per_epoch / 1e9:,.2f} GB")
    table.add_row("local feature bytes per epoch", f"{r.local_bytes_per_epoch / 1e9:,.2f} GB")
    table.add_row("sampled nodes per hop", " / ".join(f"{n:,.0f}" for n in r.sampled_nodes_per_layer))
    table.add_row("counts from", r.path)
    return table


def _breakdown(r: Any) -> Table:
    table = _table("iteration breakdown (slowest machine, critical path)", "part", "time", "% of iteration",
                   "stage alone")
    stages = r.trainer_loads[max(range(r.machines), key=lambda p: r.trainer_loads[p].iteration_time_s)].stages_s
    for key, seconds in r.breakdown.items():
        share = seconds / r.iteration_time_s if r.iteration_time_s else 0.0
        table.add_row(key, fmt_seconds(seconds), f"{share:.1%}", fmt_seconds(stages.get(key, 0.0)) if key in stages else "")
    return table


def _loads(r: Any) -> Table:
    table = _table("per machine", "machine", "train nodes", "local seeds", "input nodes", "local", "cached",
                   "remote", "remote MB/iter", "iteration")
    for t in r.trainer_loads:
        table.add_row(str(t.part), f"{t.train_nodes:,.0f}", f"{t.local_seed_fraction:.0%}", f"{t.input_nodes:,.0f}",
                      f"{t.local_input_fraction:.0%}", f"{t.cached_input_fraction:.0%}", f"{t.remote_input_fraction:.0%}",
                      f"{t.remote_bytes_per_iteration / 1e6:,.1f}", fmt_seconds(t.iteration_time_s))
    return table


@simulate_app.command("gnn")
@handles_errors
def simulate_gnn_cmd(
    graph: GraphOption, model: GnnModelOption, cluster: GnnClusterOption,
    plan: Annotated[str, typer.Option("--plan", "-p", help="GNN plan: name or YAML path.")],
    as_json: JsonFlag = False,
    trace: Annotated[Path | None, typer.Option(help="Write a Chrome trace of a few iterations here.")] = None,
) -> None:
    """Predict one epoch of distributed GNN training: time, breakdown, per-machine load, bytes moved."""
    from simulator.gnn.simulate import simulate_gnn
    from simulator.specs.catalog import load_gnn_plan

    report = simulate_gnn(graph, model, cluster, plan, trace_path=trace)
    if trace is not None:
        err.print(f"trace written to {escape(str(trace))} (open it in https://ui.perfetto.dev)")
    if as_json:
        print_json(report.to_dict())
        return
    out.print(f"[bold]{escape(report.model)}[/] on [bold]{escape(report.graph)}[/], [bold]{escape(report.cluster)}[/] "
              f"({report.machines} machines, {report.trainers} trainers)")
    out.print(f"plan: {escape(_plan_summary(load_gnn_plan(plan)))}")
    q = report.partition
    out.print(f"partition {q['method']}: edge cut {q['edge_cut_fraction']:.1%}, halo {q['halo_per_owned']:.2f} per owned "
              f"node (from {escape(q['measured_on'])})")
    out.print(_headline(report))
    out.print(_breakdown(report))
    out.print(_loads(report))


@tune_app.command("gnn")
@handles_errors
def tune_gnn_cmd(
    graph: GraphOption, model: GnnModelOption, cluster: GnnClusterOption,
    max_global_batch: Annotated[int | None, typer.Option(
        help="Upper bound on seeds per iteration over all trainers (convergence); default: DistDGL's.")] = None,
    emit: Annotated[str | None, typer.Option("--emit", help="Write launch files: dgl.")] = None,
    out_dir: Annotated[Path, typer.Option("--out", help="Where --emit writes.")] = Path("gnn_launch"),
    as_json: JsonFlag = False,
) -> None:
    """Search partitioning, trainers, samplers, batch, feature placement, cache and pipelining."""
    from tuner.gnn import launch_files, tune_gnn

    if emit not in (None, "dgl"):
        raise SpecError("--emit", emit, "the launch format to emit is 'dgl' (with simtune's executor command)")
    with SearchProgress() as progress:
        result = tune_gnn(graph, model, cluster, max_global_batch=max_global_batch, progress=progress)
    if emit:
        files = launch_files(result.best.report.graph, graph, model, model, cluster, result.best.plan)
        files["plan.yaml"] = result.best.plan.to_yaml() if hasattr(result.best.plan, "to_yaml") else _yaml(result.best.plan)
        for name, text in files.items():
            write_text_atomic(out_dir / name, text)
            err.print(f"wrote {escape(str(out_dir / name))}")
    if as_json:
        print_json(result.to_dict())
        return
    best = result.best
    out.print(f"tuned plan: {escape(_plan_summary(best.plan))}")
    table = _table("vs DistDGL's defaults", "plan", "epoch", "iteration", "remote GB/epoch", "speedup", "settings")
    rows = [("tuned", best)] + ([("distdgl-default", result.baseline)] if result.baseline else [])
    for name, e in rows:
        speedup = e.report.epoch_time_s / best.report.epoch_time_s
        table.add_row(name, fmt_seconds(e.report.epoch_time_s), fmt_seconds(e.report.iteration_time_s),
                      f"{e.report.remote_bytes_per_epoch / 1e9:,.2f}", f"{speedup:.2f}x", escape(_plan_summary(e.plan)))
    out.print(table)
    s = result.search
    out.print(f"search: {s['evaluated']:,} plans ({s['feasible']:,} feasible, {s['infeasible']:,} infeasible) in "
              f"{s['seconds']:.1f} s, {s['evaluations_per_s']:,.0f}/s; global batch <= {s['max_global_batch']:,}")


def _yaml(plan: Any) -> str:
    import yaml

    return yaml.safe_dump(plan.to_dict(), sort_keys=False)


@validate_app.command("gnn")
@handles_errors
def validate_gnn_cmd(as_json: JsonFlag = False, strict: StrictFlag = False) -> None:
    """Predict DistDGL's published figures (epoch time, scaling, METIS vs random)."""
    from simulator.gnn.validation import validate_gnn

    err.print("validating GNN predictions against DistDGL's published figures ...")
    result = validate_gnn()
    if as_json:
        print_json(result.to_dict())
    else:
        table = _table("GNN: predicted vs published (DistDGL, 16 or 4 x m5n.24xlarge)", "check", "quantity",
                       "predicted", "published", "target", "result", numeric_from=2)
        for r in result.rows:
            verdict = Text("-") if r["passed"] is None else (
                Text("PASS", style="green") if r["passed"] else Text("FAIL", style="bold red"))
            table.add_row(escape(r["id"]), escape(r["quantity"]), fmt_number(r["predicted"]),
                          fmt_number(r["measured"]), escape(r["target"]), verdict)
        out.print(table)
        for r in result.rows:
            out.print(f"  {escape(r['id'])}: {escape(r['note'])}")
        out.print(f"assumed: {escape(result.to_dict()['assumed'])}")
        out.print(f"\\[1] {escape(result.to_dict()['source'])}")
    if strict and any(r["passed"] is False for r in result.rows):
        err.print(Text("failed: " + ", ".join(r["id"] for r in result.rows if r["passed"] is False), style="bold red"))
        raise typer.Exit(EXIT_CHECK_FAILED)
