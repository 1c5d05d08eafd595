"""`simtune simulate train` and `simtune tune train`: one training iteration, and the search
for the fastest plan that fits (with `--emit`, its launch files)."""

from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from simtune.cli.apps import simulate_app, tune_app
from simtune.cli.render import (
    ClusterOption,
    JsonFlag,
    ModelOption,
    ProfileOption,
    SearchProgress,
    _engines,
    _schedule,
    _table,
    costs_line,
    err,
    fmt_gib,
    fmt_seconds,
    handles_errors,
    out,
    print_json,
    print_written,
)
from simulator.errors import SpecError
from simulator.files import write_text_atomic
from simulator.specs.catalog import load_cluster, load_model, load_plan
from simulator.training import TrainingReport, simulate_training
from simulator.training.report import BREAKDOWN_KEYS

# --- simulate train ------------------------------------------------------------------------


def _plan_summary(plan: Any) -> str:
    parts = [f"tp {plan.tp}", f"pp {plan.pp}", f"dp {plan.dp}", f"mbs {plan.micro_batch_size}",
             f"gbs {plan.global_batch_size:,}", _schedule(plan), f"zero {plan.zero_stage}",
             f"recompute {plan.recompute}"]
    if plan.sequence_parallel:
        parts.append("sequence parallel")
    if plan.offload.any:
        parts.append("offload")
    return " · ".join(parts + _fsdp_flags(plan))


def _fsdp_flags(plan: Any) -> list[str]:
    """The sharded-data-parallel settings that differ from FSDP2's defaults."""
    flags = [f"HSDP shard {plan.dp_shard} x {plan.replicate_degree} replicas"] if plan.replicate_degree > 1 else []
    if 3 in plan.stage_zero():
        if not plan.reshard_after_forward:
            flags.append("no reshard after forward")
        if not plan.reshard_between_microbatches:
            flags.append("no reshard between micro-batches")
    if plan.precision != "bf16":
        flags.append(plan.precision + (" all-gather" if plan.fp8_all_gather else ""))
    return flags


def _headline_table(r: TrainingReport) -> Table:
    table = _table(None, "metric", "value")
    mem_share = r.peak_memory_bytes / r.device_memory_bytes if r.device_memory_bytes else math.nan
    feasible = Text("yes", style="green")
    if not r.feasible:
        feasible = Text("no (see below)", style="bold red")
    table.add_row("iteration time", fmt_seconds(r.iteration_time_s))
    table.add_row("tokens/s", f"{r.tokens_per_s:,.0f}")
    table.add_row("MFU", f"{r.mfu:.1%}")
    table.add_row("HFU", f"{r.hfu:.1%}")
    table.add_row("model TFLOP/s per GPU", f"{r.model_tflops_per_device:,.1f}")
    table.add_row("peak memory", f"{fmt_gib(r.peak_memory_bytes)} GiB of "
                  f"{fmt_gib(r.device_memory_bytes)} GiB ({mem_share:.0%})")
    table.add_row("feasible", feasible)
    if r.cost_per_iteration_usd is not None:
        table.add_row("cost per iteration", f"${r.cost_per_iteration_usd:,.4g} "
                      f"(${r.price_per_device_hour:g} per GPU-hour)")
        table.add_row("cost per million tokens", f"${r.cost_per_million_tokens_usd:,.4g}")
    return table


def _breakdown_table(r: TrainingReport) -> Table:
    table = _table("iteration breakdown (slowest stage)", "part", "time", "% of iteration")
    keys = [*BREAKDOWN_KEYS, *(k for k in r.breakdown if k not in BREAKDOWN_KEYS)]
    for key in keys:
        seconds = r.breakdown.get(key, 0.0)
        share = seconds / r.iteration_time_s if r.iteration_time_s else math.nan
        table.add_row(key, fmt_seconds(seconds), f"{share:.1%}")
    table.add_row(Text("total", style="bold"), fmt_seconds(sum(r.breakdown.values())), "")
    return table


MEMORY_SHORT = {"weights": "weights", "gradients": "grads", "optimizer": "optim",
                "activations": "activ", "other": "other"}


def _stage_table(r: TrainingReport) -> Table:
    headers = ("stage", "layers", "ckpt", "in flight", "total", *MEMORY_SHORT.values())
    table = _table("per stage (memory in GiB)", *headers, numeric_from=0)
    gib = functools.partial(fmt_gib, digits=1, sep="")  # narrow: the table has ten columns
    for s in r.stages:
        style = "red" if s.memory_bytes > r.device_memory_bytes else None
        table.add_row(str(s.stage), str(s.layers), str(s.checkpointed_layers),
                      str(s.peak_inflight_microbatches), gib(s.memory_bytes),
                      *(gib(s.memory.get(k, 0.0)) for k in MEMORY_SHORT), style=style)
    return table


@simulate_app.command("train")
@handles_errors
def simulate_train(
    model: ModelOption,
    cluster: ClusterOption,
    plan: Annotated[str, typer.Option("--plan", "-p", help="Training plan: name or YAML path.")],
    as_json: JsonFlag = False,
    trace: Annotated[Path | None, typer.Option(help="Write a Chrome trace (JSON) here.")] = None,
    profile: ProfileOption = None,
) -> None:
    """Predict one training iteration: time, throughput, MFU, memory, breakdown."""
    model_spec, cluster_spec, plan_spec = load_model(model), load_cluster(cluster, profile), load_plan(plan)
    report = simulate_training(model_spec, cluster_spec, plan_spec, trace_path=trace)
    if trace is not None:
        err.print(f"trace written to {escape(str(trace))} (open it in https://ui.perfetto.dev)")
    if as_json:
        print_json(report.to_dict())
        return
    device = cluster_spec.device.name
    out.print(f"[bold]{escape(model_spec.name)}[/] on [bold]{escape(cluster_spec.name)}[/] "
              f"({cluster_spec.num_devices} x {escape(device)})")
    out.print(f"plan [bold]{escape(plan_spec.name or plan)}[/]: {escape(_plan_summary(plan_spec))}")
    out.print(escape(costs_line(cluster_spec.device)), soft_wrap=True)
    out.print(_headline_table(report))
    out.print(_breakdown_table(report))
    out.print(_stage_table(report))
    if not report.feasible:
        reason = report.infeasible_reason or "does not fit"
        out.print(Text(f"infeasible: {reason}", style="bold red"))


# --- tune train ----------------------------------------------------------------------------

BASELINES = ("megatron", "aceso")


def tune_dict(result: Any) -> dict[str, Any]:
    """The tuner contract; a baseline that found no fitting plan is null (and noted on stderr)."""
    for name, tuned in result.baselines.items():
        if tuned is None:
            err.print(f"note: baseline {name} found no plan that fits")
    return result.to_dict()


def _offload(o: Any) -> str:
    return "/".join(f"{getattr(o, k):g}" for k in ("weights", "gradients", "optimizer", "activations"))


def _tuned_stage_table(model: Any, plan: Any, r: TrainingReport) -> Table:
    table = _table(None, "stage", "layers", "checkpointed", "ZeRO", "offload w/g/o/a",
                   "memory GiB", numeric_from=1)
    rows = zip(r.stages, plan.stage_layers(model), plan.stage_checkpointed(model),
               plan.stage_zero(), plan.stage_offload())
    for s, layers, ckpt, zero, offload in rows:
        table.add_row(str(s.stage), str(layers), str(ckpt), str(zero), _offload(offload),
                      fmt_gib(s.memory_bytes, digits=1))
    return table


def _prediction_table(best: Any) -> Table:
    r = best.report
    table = _table(None, "predicted", "value")
    table.add_row("iteration time (discrete-event)", fmt_seconds(r.iteration_time_s))
    table.add_row("iteration time (closed form)", fmt_seconds(best.analytic_time_s))
    table.add_row("tokens/s", f"{r.tokens_per_s:,.0f}")
    table.add_row("MFU", f"{r.mfu:.1%}")
    table.add_row("peak memory", f"{fmt_gib(r.peak_memory_bytes)} GiB of "
                  f"{fmt_gib(r.device_memory_bytes)} GiB")
    return table


def _short_plan(plan: Any) -> str:
    """Degrees, micro-batch, virtual stages and memory options, short enough for a table cell."""
    zeros = "/".join(map(str, sorted(set(plan.stage_zero()))))
    parts = [f"tp{plan.tp} pp{plan.pp} dp{plan.dp} mbs{plan.micro_batch_size}"
             + (f" v{plan.virtual_stages}" if plan.schedule == "interleaved" else ""),
             f"zero {zeros}"]
    if plan.recompute != "none":
        parts.append(f"{plan.recompute} recompute")
    if plan.sequence_parallel:
        parts.append("sp")
    if any(o.any for o in plan.stage_offload()):
        parts.append("offload")
    return ", ".join(parts + _fsdp_flags(plan))


def _family_verdict(result: Any) -> str:
    """One sentence: the winning family, and its margin over each other family's best plan."""
    best = result.best.report.iteration_time_s
    others = sorted((t.report.iteration_time_s / best, name) for name, t in result.families.items()
                    if t is not None and t is not result.best)
    margins = ", ".join(f"{(ratio - 1):.1%} over {name}" for ratio, name in others)
    return f"{result.winner} wins" + (f": {margins}" if margins else "")


def _plans_table(title: str, label: str, ratio: str, best: Any, rows: dict[str, Any],
                 digits: int, lead: tuple[str, ...] = (), plan_header: str = "plan") -> Table:
    """One row per named plan (None: nothing fits): its time, MFU and time over `best`'s."""
    t_best = best.report.iteration_time_s
    table = _table(title, label, "iteration time", "MFU", ratio, plan_header)
    table.columns[-1].justify, table.columns[-1].no_wrap = "left", False
    if lead:
        table.add_row(*lead, fmt_seconds(t_best), f"{best.report.mfu:.1%}", "", escape(_short_plan(best.plan)))
    for name, tuned in rows.items():
        if tuned is None:
            table.add_row(escape(name), "", "", "", Text("no plan fits", style="red"))
            continue
        r = tuned.report
        table.add_row(escape(name), fmt_seconds(r.iteration_time_s), f"{r.mfu:.1%}",
                      f"{r.iteration_time_s / t_best:.{digits}f}x", escape(_short_plan(tuned.plan)))
    return table


def _family_table(result: Any) -> Table:
    """Best plan of each family (FSDP, HSDP, FSDP+TP, 3D) and its time over the winner's."""
    return _plans_table(f"by family (winner: {result.winner})", "family", "vs winner", result.best,
                        result.families, 3)


def _baseline_table(result: Any) -> Table:
    return _plans_table("vs baselines", "plan", "speedup", result.best, result.baselines, 2, ("tuned",), "layout")


def _search_table(search: Any) -> Table:
    s = search.to_dict()
    table = _table("search", "statistic", "value")
    table.add_row("layouts (feasible)", f"{s['layouts']:,} ({s['layouts_feasible']:,})")
    table.add_row("stage options evaluated", f"{s['evaluated']:,}")
    table.add_row("feasible / infeasible", f"{s['feasible']:,} / {s['infeasible']:,}")
    table.add_row("inter-stage MILPs", f"{s['milps']:,}")
    table.add_row("seconds", f"{s['seconds']:.2f}")
    table.add_row("evaluations/s", f"{s['evaluations_per_s']:,.0f}")
    return table


def emit_launch(model: Any, cluster: Any, plan: Any, engines: list[str], out_dir: Path) -> list[Any]:
    """Each engine's launch files, and always plan.yaml (`simulate train --plan` reads it).

    An engine that refuses this plan is skipped while the others are written; its refusal is
    then raised (exit code 2), so a script notices what is missing.
    """
    from executor.launch import LaunchFile, emit_launch_configs
    from executor.launch.torchrun import spec_files

    refused: list[Any] = []
    files = emit_launch_configs(model, cluster, plan, engines, out_dir, refused=refused)
    if not any(f.path.name == "plan.yaml" for f in files):
        # The same plan.yaml the torchrun and slurm writers put beside their scripts.
        plan_file = next(f for f in spec_files(model, cluster, plan, "simtune")[1]
                         if f.path.name == "plan.yaml")
        path = out_dir / plan_file.path
        write_text_atomic(path, plan_file.text)
        files.append(LaunchFile(plan_file.engine, path, plan_file.text))
    print_written(files)
    if refused:
        raise refused[0] if len(refused) == 1 else SpecError(
            "emit", ",".join(r.value for r in refused), "; ".join(r.allowed for r in refused))
    return files


@tune_app.command("train")
@handles_errors
def tune_train(
    model: ModelOption,
    cluster: ClusterOption,
    global_batch_size: Annotated[int, typer.Option("--global-batch-size", "-b", min=1,
                                                   help="Sequences per iteration.")],
    seq_length: Annotated[int | None, typer.Option(min=1, help="Default: the model's.")] = None,
    as_json: JsonFlag = False,
    emit: Annotated[str | None, typer.Option(
        metavar="ENGINES", help="Write launch files for these engines, comma-separated: "
        "megatron, torchtitan (0.3), torchtitan@0.2 (TOML), deepspeed, torchrun, slurm.")
    ] = None,
    out_dir: Annotated[Path, typer.Option("--out", help="Folder for --emit.")] = Path("simtune-launch"),
    no_baselines: Annotated[bool, typer.Option("--no-baselines", help="Skip the baselines.")] = False,
    tp_across_nodes: Annotated[bool, typer.Option(
        "--tp-across-nodes", help="Also try tensor parallel groups larger than a node.")] = False,
    profile: ProfileOption = None,
) -> None:
    """Find the fastest training plan that fits, and compare it with Megatron-LM and Aceso."""
    # Imported here so that the other commands never pay for (or depend on) tuner and executor.
    from executor.launch import ENGINES, check_engines
    from tuner.training import tune_training

    engines = _engines(emit, ENGINES)
    model_spec, cluster_spec = load_model(model), load_cluster(cluster, profile)
    check_engines(model_spec, engines)  # an engine that cannot run the model refuses before the search
    baselines = () if no_baselines else BASELINES
    with SearchProgress() as progress:
        result = tune_training(model_spec, cluster_spec, global_batch_size, seq_length,
                               baselines=baselines, progress=progress,
                               tp_within_node=not tp_across_nodes)
    data = tune_dict(result)
    if engines:
        emit_launch(model_spec, cluster_spec, result.best.plan, engines, out_dir)
    if as_json:
        print_json(data)
        return
    plan, seq = result.best.plan, seq_length or model_spec.seq_length
    out.print(f"[bold]{escape(model_spec.name)}[/] on [bold]{escape(cluster_spec.name)}[/] "
              f"({cluster_spec.num_devices} x {escape(cluster_spec.device.name)}), "
              f"global batch {global_batch_size:,} x {seq:,} tokens")
    out.print(f"tuned plan: {escape(_plan_summary(plan))}")
    out.print(escape(costs_line(cluster_spec.device)), soft_wrap=True)
    out.print(_tuned_stage_table(model_spec, plan, result.best.report))
    out.print(_prediction_table(result.best))
    if result.families:
        out.print(_family_table(result))
        out.print(_family_verdict(result))
    if result.baselines:
        out.print(_baseline_table(result))
    out.print(_search_table(result.search))
