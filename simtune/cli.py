"""simtune's command line: `catalog`, `simulate train|serve`, `tune train`, `validate train|serve`.

Every spec argument takes a catalog name (`gpt3-175b`, `16x8xa100-80gb`) or a path to a YAML
file of the same schema. Human output is rich tables on stdout. With `--json` a command prints
exactly one JSON object on stdout and nothing else; notes and errors always go to stderr.
Input errors (`SpecError`, `InfeasiblePlan`, a missing file) print `error: ...` and exit 2,
like click's own usage errors, so scripts can tell them from a failed `--strict` check (1).
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import Enum, StrEnum
from pathlib import Path
from typing import Annotated, Any, NoReturn, TypeVar

import numpy as np
import typer
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from simulator.errors import InfeasiblePlan, SpecError
from simulator.specs.catalog import (
    catalog_names,
    load_cluster,
    load_deployment,
    load_device,
    load_engine,
    load_model,
    load_plan,
    load_workload,
)
from simulator.training import TrainingReport, simulate_training
from simulator.training.report import BREAKDOWN_KEYS

GiB = 2**30
EXIT_INPUT_ERROR = 2
EXIT_CHECK_FAILED = 1

out = Console(highlight=False)              # tables; never used when --json is given
err = Console(stderr=True, highlight=False)  # notes and errors

app = typer.Typer(
    help="Simulation-first performance modeling for distributed LLM training and serving.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)
simulate_app = typer.Typer(
    help="Predict one run of a workload from its specs.", no_args_is_help=True
)
validate_app = typer.Typer(
    help="Compare predictions with published measurements.", no_args_is_help=True
)
tune_app = typer.Typer(help="Search for the fastest plan that fits.", no_args_is_help=True)
app.add_typer(simulate_app, name="simulate")
app.add_typer(tune_app, name="tune")
app.add_typer(validate_app, name="validate")

JsonFlag = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")]
ModelOption = Annotated[str, typer.Option("--model", "-m", help="Model: catalog name or YAML path.")]
ClusterOption = Annotated[str, typer.Option("--cluster", "-c", help="Cluster: name, NxNODE or YAML.")]
F = TypeVar("F", bound=Callable[..., Any])


# --- shared helpers ------------------------------------------------------------------------


@contextmanager
def input_errors() -> Iterator[None]:
    """Turn the user's input errors into `error: ...` on stderr and exit code 2 (no traceback)."""
    try:
        yield
    except (SpecError, InfeasiblePlan) as e:
        _fail(str(e))
    except FileNotFoundError as e:
        _fail(f"{e.strerror or 'file not found'}: {e.filename}" if e.filename else str(e))


def _fail(message: str) -> NoReturn:
    err.print(Text(f"error: {message}", style="bold red"), soft_wrap=True)
    raise typer.Exit(EXIT_INPUT_ERROR)


def handles_errors(fn: F) -> F:
    """Decorator form of `input_errors` for commands (typer reads the wrapped signature)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with input_errors():
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def to_jsonable(obj: Any) -> Any:
    """Plain JSON data: numpy scalars/arrays unwrapped, non-finite floats as null."""
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return to_jsonable(obj.item())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None  # strict JSON has no NaN/Infinity
    if isinstance(obj, (Path, Enum)):
        return str(obj.value if isinstance(obj, Enum) else obj)
    return obj


def print_json(obj: Any) -> None:
    """The one JSON object a `--json` command prints on stdout."""
    typer.echo(json.dumps(to_jsonable(obj), indent=2, allow_nan=False))


def fmt_seconds(s: float) -> str:
    """A duration with a unit that keeps 3-4 significant digits."""
    if not math.isfinite(s):
        return str(s)
    if s == 0.0:
        return "0"
    if abs(s) >= 1.0:
        return f"{s:.3f} s"
    if abs(s) >= 1e-3:
        return f"{s * 1e3:.3f} ms"
    return f"{s * 1e6:.1f} µs"


def fmt_gib(nbytes: float, digits: int = 2, sep: str = ",") -> str:
    return f"{nbytes / GiB:{sep}.{digits}f}"


def fmt_number(x: Any) -> str:
    """A measured or predicted value of any magnitude; non-numbers as they are."""
    if isinstance(x, bool) or not isinstance(x, (int, float, np.number)):
        return escape(str(x))
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    return f"{x:.4g}"


def _table(title: str | None, *headers: str, numeric_from: int = 1) -> Table:
    """A compact table; columns from `numeric_from` on are right-aligned, the first never wraps."""
    table = Table(title=title, title_justify="left", title_style="bold", box=box.SIMPLE_HEAD,
                  show_edge=False, collapse_padding=True)
    for i, h in enumerate(headers):
        numeric = i >= numeric_from
        table.add_column(h, justify="right" if numeric else "left", no_wrap=numeric or i == 0)
    return table


# --- catalog -------------------------------------------------------------------------------


class Kind(StrEnum):
    devices = "devices"
    clusters = "clusters"
    models = "models"
    plans = "plans"
    deployments = "deployments"
    workloads = "workloads"
    engines = "engines"


@dataclass(frozen=True)
class Column:
    """One catalog column: its JSON key, table header, getter on the spec, and format."""

    key: str
    header: str
    get: Callable[[Any], Any]
    fmt: Callable[[Any], str] = str
    numeric: bool = True


def _device_source(d: Any) -> str:
    return f"{d.source} ({d.measured_on})" if d.measured_on else d.source


def _schedule(p: Any) -> str:
    return f"{p.schedule} (v={p.virtual_stages})" if p.schedule == "interleaved" else p.schedule


def _layout(layout: dict[str, int]) -> str:
    return f"tp{layout['tp']} pp{layout['pp']}"


def _arrival(arrival: Any) -> str:
    """`offline`, or `poisson 2/s`."""
    if arrival.kind_ == "poisson":
        return f"poisson {arrival.rate_per_s:g}/s"
    return arrival.kind_


def _lengths(dist: Any) -> str:
    if dist.distribution == "fixed":
        return str(dist.value)
    if dist.distribution == "uniform":
        return f"uniform {dist.min}-{dist.max}"
    return f"lognormal mean {dist.mean:g} σ {dist.sigma:g}"


def _tokens(w: Any) -> str:
    """Where a workload's lengths come from: its preset, its trace, or in/out distributions."""
    if w.preset:
        return w.preset
    if w.trace:
        return f"trace {w.trace}"
    return f"in {_lengths(w.input_tokens)} / out {_lengths(w.output_tokens)}"


CATALOG: dict[str, tuple[Callable[[str], Any], list[Column]]] = {
    "devices": (load_device, [
        Column("full_name", "device", lambda d: d.name, numeric=False),
        Column("peak_bf16_tflops", "bf16 TFLOP/s", lambda d: d.peak_flops / 1e12, "{:,.0f}".format),
        Column("memory_GiB", "memory GiB", lambda d: d.memory_GiB, "{:g}".format),
        Column("hbm_bandwidth_GBps", "HBM GB/s", lambda d: d.hbm_bandwidth_GBps, "{:,.0f}".format),
        Column("source", "source", _device_source, numeric=False),
    ]),
    "clusters": (load_cluster, [
        Column("num_nodes", "nodes", lambda c: c.num_nodes),
        Column("devices_per_node", "per node", lambda c: c.devices_per_node),
        Column("device", "device", lambda c: c.device.name, numeric=False),
        Column("intra_node_bandwidth_GBps", "intra GB/s", lambda c: c.intra_node_bandwidth_GBps,
               "{:g}".format),
        Column("inter_node_bandwidth_GBps", "inter GB/s", lambda c: c.inter_node_bandwidth_GBps,
               "{:g}".format),
        Column("intra_node_link", "link", lambda c: c.intra_node_link, numeric=False),
    ]),
    "models": (load_model, [
        Column("num_layers", "layers", lambda m: m.num_layers),
        Column("hidden_size", "hidden", lambda m: m.hidden_size),
        Column("num_attention_heads", "heads", lambda m: m.num_attention_heads),
        Column("num_kv_heads", "kv", lambda m: m.num_kv_heads),
        Column("ffn_hidden_size", "ffn", lambda m: m.ffn_hidden_size),
        Column("vocab_size", "vocab", lambda m: m.vocab_size),
        Column("seq_length", "seq", lambda m: m.seq_length),
        Column("activation", "act", lambda m: m.activation, numeric=False),
    ]),
    "plans": (load_plan, [
        Column("tp", "tp", lambda p: p.tp),
        Column("pp", "pp", lambda p: p.pp),
        Column("dp", "dp", lambda p: p.dp),
        Column("micro_batch_size", "mbs", lambda p: p.micro_batch_size),
        Column("global_batch_size", "gbs", lambda p: p.global_batch_size, "{:,}".format),
        Column("schedule", "schedule", _schedule, numeric=False),
        Column("zero_stage", "zero", lambda p: p.zero_stage),
        Column("recompute", "recompute", lambda p: p.recompute, numeric=False),
    ]),
    "deployments": (load_deployment, [
        Column("dp", "dp", lambda d: d.dp),
        Column("prefill", "prefill", lambda d: d.prefill.to_dict(), _layout),
        Column("decode", "decode", lambda d: d.decode.to_dict(), _layout),
        Column("scheduler", "scheduler", lambda d: d.scheduler, numeric=False),
        Column("max_num_seqs", "max seqs", lambda d: d.max_num_seqs),
        Column("max_batched_tokens", "max tokens", lambda d: d.max_batched_tokens,
               "{:,}".format),
        Column("cpu_kv_buffer_GB", "CPU GB", lambda d: d.cpu_kv_buffer_GB, "{:g}".format),
    ]),
    "workloads": (load_workload, [
        Column("num_requests", "requests", lambda w: w.num_requests, "{:,}".format),
        Column("arrival", "arrival", lambda w: _arrival(w.arrival), numeric=False),
        Column("tokens", "preset or lengths", _tokens, numeric=False),
    ]),
    "engines": (load_engine, [
        Column("step_overhead_us", "step us", lambda e: e.step_overhead_us, "{:g}".format),
        Column("per_sequence_overhead_us", "per seq us", lambda e: e.per_sequence_overhead_us, "{:g}".format),
        Column("source", "source", lambda e: e.source, numeric=False),
    ]),
}


def catalog_rows(kind: str) -> list[dict[str, Any]]:
    """One dict per catalog entry of `kind`: its name, then the kind's key fields."""
    load, columns = CATALOG[kind]
    rows = []
    for name in catalog_names(kind)[kind]:
        spec = load(name)
        rows.append({"name": name, **{c.key: c.get(spec) for c in columns}})
    return rows


def _catalog_table(kind: str, rows: list[dict[str, Any]]) -> Table:
    columns = CATALOG[kind][1]
    table = _table(kind, "name", *(c.header for c in columns))
    for col, c in zip(table.columns[1:], columns):
        col.justify, col.no_wrap = ("right", True) if c.numeric else ("left", False)
    for row in rows:
        table.add_row(escape(row["name"]), *(escape(c.fmt(row[c.key])) for c in columns))
    return table


@app.command()
@handles_errors
def catalog(
    kind: Annotated[Kind | None, typer.Option(help="Only this kind of spec.")] = None,
    as_json: JsonFlag = False,
) -> None:
    """List the named specs: devices, clusters, models, training plans, serving deployments
    and workloads."""
    kinds = [kind.value] if kind else list(CATALOG)
    data = {k: catalog_rows(k) for k in kinds}
    if as_json:
        print_json(data)
        return
    for k in kinds:
        out.print(_catalog_table(k, data[k]))
    if "clusters" in kinds:
        out.print("Clusters also take the multi-node form N x node, e.g. [bold]16x8xa100-80gb[/] "
                  "(16 nodes of 8xa100-80gb).")
    out.print("Every spec argument also accepts a path to a YAML file of the same schema.")


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
) -> None:
    """Predict one training iteration: time, throughput, MFU, memory, breakdown."""
    model_spec, cluster_spec, plan_spec = load_model(model), load_cluster(cluster), load_plan(plan)
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
    out.print(_headline_table(report))
    out.print(_breakdown_table(report))
    out.print(_stage_table(report))
    if not report.feasible:
        reason = report.infeasible_reason or "does not fit"
        out.print(Text(f"infeasible: {reason}", style="bold red"))


# --- simulate serve ------------------------------------------------------------------------


def _deployment_summary(d: Any) -> str:
    layout = (f"prefill {d.prefill.describe()} → decode {d.decode.describe()} (re-sharding)"
              if d.resharding else f"{d.prefill.describe()} (static)")
    parts = [f"dp {d.dp}", layout, f"scheduler {d.scheduler}"]
    if d.cpu_kv_buffer_GB:
        parts.append(f"CPU KV {d.cpu_kv_buffer_GB:g} GB")
    return " · ".join(parts)


def _workload_summary(w: Any) -> str:
    return " · ".join([f"{w.num_requests:,} requests", _arrival(w.arrival), _tokens(w)])


def _ms(p: dict[str, float]) -> str:
    """p50 / p90 / p99 of a latency in seconds, shown in ms."""
    values = [p.get(k, math.nan) for k in ("p50", "p90", "p99")]
    return " / ".join(f"{v * 1e3:,.2f}" if math.isfinite(v) else "n/a" for v in values)


def _serving_table(r: Any) -> Table:
    table = _table(None, "metric", "value")
    table.add_row("output tokens/s", f"{r.output_tokens_per_s:,.1f}")
    table.add_row("total tokens/s", f"{r.total_tokens_per_s:,.1f}")
    table.add_row("requests/s", f"{r.requests_per_s:,.3f}")
    table.add_row("makespan", fmt_seconds(r.makespan_s))
    table.add_row("TTFT p50 / p90 / p99 (ms)", _ms(r.ttft_s))
    table.add_row("TPOT p50 / p90 / p99 (ms)", _ms(r.tpot_s))
    table.add_row("preemptions", f"{r.preemptions:,}")
    transitions = f"{r.transitions:,} ({fmt_seconds(r.transition_time_s)})" if r.transitions else "0"
    table.add_row("transitions (time in them)", transitions)
    table.add_row("KV utilization mean / max", f"{r.kv_utilization['mean']:.1%} / "
                  f"{r.kv_utilization['max']:.1%}")
    table.add_row("steps", " · ".join(f"{k} {n:,}" for k, n in r.steps.items()) or "0")
    if r.speculation:
        s = r.speculation
        acc = "-" if s["acceptance_rate"] is None else f"{s['acceptance_rate']:.2f}"
        table.add_row(f"speculation ({s['policy']}, draft {s['draft']})",
                      f"mean k {s['mean_k']:.2f} · acceptance {acc}")
    return table


@simulate_app.command("serve")
@handles_errors
def simulate_serve(
    model: ModelOption,
    cluster: ClusterOption,
    deployment: Annotated[str, typer.Option("--deployment", "-d",
                                            help="Serving deployment: name or YAML path.")],
    workload: Annotated[str, typer.Option("--workload", "-w",
                                          help="Serving workload: name or YAML path.")],
    as_json: JsonFlag = False,
    trace: Annotated[Path | None, typer.Option(help="Write a Chrome trace (JSON) here.")] = None,
) -> None:
    """Predict serving a workload: throughput, TTFT/TPOT percentiles, KV use, transitions."""
    from simulator.serving.simulate import simulate_serving

    model_spec, cluster_spec = load_model(model), load_cluster(cluster)
    dep_spec, wl_spec = load_deployment(deployment), load_workload(workload)
    report = simulate_serving(model_spec, cluster_spec, dep_spec, wl_spec, trace_path=trace)
    if trace is not None:
        err.print(f"trace written to {escape(str(trace))} (open it in https://ui.perfetto.dev)")
    if as_json:
        print_json(report.to_dict())
        return
    out.print(f"[bold]{escape(model_spec.name)}[/] on [bold]{escape(cluster_spec.name)}[/] "
              f"({cluster_spec.num_devices} x {escape(cluster_spec.device.name)})")
    out.print(f"deployment [bold]{escape(dep_spec.name or deployment)}[/]: "
              f"{escape(_deployment_summary(dep_spec))}", soft_wrap=True)
    out.print(f"workload [bold]{escape(wl_spec.name or workload)}[/]: "
              f"{escape(_workload_summary(wl_spec))}", soft_wrap=True)  # paths stay whole
    out.print(_serving_table(report))


# --- tune train ----------------------------------------------------------------------------

BASELINES = ("megatron", "aceso")


class SearchProgress:
    """The `progress(stage, done, total)` callback of `tune_training` as a transient bar on stderr.

    One row per stage. Drawn only on a terminal: elsewhere rich would leave an empty line behind.
    """

    def __init__(self) -> None:
        self.bar = Progress(SpinnerColumn(), "{task.description}", BarColumn(),
                            MofNCompleteColumn(), TimeElapsedColumn(), console=err, transient=True)
        self.rows: dict[str, Any] = {}

    def __enter__(self) -> SearchProgress:
        if err.is_terminal:
            self.bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar.live.is_started:
            self.bar.stop()

    def __call__(self, stage: str, done: int, total: int) -> None:
        if stage not in self.rows:
            self.rows[stage] = self.bar.add_task(stage, total=total)
        self.bar.update(self.rows[stage], completed=done, total=total)


def _engines(emit: str | None, allowed: tuple[str, ...]) -> list[str]:
    """The engine names of `--emit a,b`, checked before the search so a typo costs no time."""
    from executor.launch.base import engine_names

    return engine_names([e.strip() for e in (emit or "").split(",") if e.strip()], allowed)


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
    """Each engine's launch files, and always plan.yaml (`simulate train --plan` reads it)."""
    from executor.launch import LaunchFile, emit_launch_configs
    from executor.launch.torchrun import spec_files

    files = emit_launch_configs(model, cluster, plan, engines, out_dir)
    if not any(f.path.name == "plan.yaml" for f in files):
        # The same plan.yaml the torchrun and slurm writers put beside their scripts.
        plan_file = next(f for f in spec_files(model, cluster, plan, "simtune")[1]
                         if f.path.name == "plan.yaml")
        path = out_dir / plan_file.path
        path.write_text(plan_file.text, encoding="utf-8")
        files.append(LaunchFile(plan_file.engine, path, plan_file.text))
    for f in files:
        err.print(f"wrote {escape(str(f.path))}")
    notes = dict.fromkeys((f.engine, s) for f in files for s in f.approximations)
    for engine, sentence in notes:
        err.print(Text(f"warning: {engine}: {sentence}", style="yellow"), soft_wrap=True)
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
        "megatron, torchtitan, deepspeed, torchrun, slurm.")
    ] = None,
    out_dir: Annotated[Path, typer.Option("--out", help="Folder for --emit.")] = Path("simtune-launch"),
    no_baselines: Annotated[bool, typer.Option("--no-baselines", help="Skip the baselines.")] = False,
    tp_across_nodes: Annotated[bool, typer.Option(
        "--tp-across-nodes", help="Also try tensor parallel groups larger than a node.")] = False,
) -> None:
    """Find the fastest training plan that fits, and compare it with Megatron-LM and Aceso."""
    # Imported here so that the other commands never pay for (or depend on) tuner and executor.
    from executor.launch import ENGINES
    from tuner.training import tune_training

    engines = _engines(emit, ENGINES)
    model_spec, cluster_spec = load_model(model), load_cluster(cluster)
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
    out.print(_tuned_stage_table(model_spec, plan, result.best.report))
    out.print(_prediction_table(result.best))
    if result.families:
        out.print(_family_table(result))
        out.print(_family_verdict(result))
    if result.baselines:
        out.print(_baseline_table(result))
    out.print(_search_table(result.search))


# --- tune serve ---------------------------------------------------------------------------

def _deployment_short(d: Any) -> str:
    def lay(p: Any) -> str:
        return f"tp{p.tp}pp{p.pp}"

    layout = f"{lay(d.prefill)}→{lay(d.decode)}" if d.resharding else lay(d.prefill)
    return f"dp{d.dp} {layout} {d.scheduler}"


def _serving_comparison_table(result: Any) -> Table:
    table = _table("static vs re-sharding", "", "deployment", "output tok/s", "TTFT p50 ms",
                   "trans.", "vs static", numeric_from=2)
    static = result.static.report.output_tokens_per_s if result.static else None
    for family, best in (("static", result.static), ("re-sharding", result.resharding)):
        if best is None:
            table.add_row(family, "nothing fits", "-", "-", "-", "-")
            continue
        r = best.report
        ratio = f"{r.output_tokens_per_s / static:.2f}x" if static else "-"
        table.add_row(family, _deployment_short(best.deployment), f"{r.output_tokens_per_s:,.1f}",
                      f"{r.ttft_s['p50'] * 1e3:,.1f}", f"{r.transitions:,}", ratio)
    return table


@tune_app.command("serve")
@handles_errors
def tune_serve(
    model: ModelOption,
    cluster: ClusterOption,
    workload: Annotated[str, typer.Option("--workload", "-w", help="Serving workload: name or YAML path.")],
    as_json: JsonFlag = False,
    emit: Annotated[str | None, typer.Option(
        metavar="ENGINES", help="Write launch commands of the static winner: vllm, sglang.")] = None,
    out_dir: Annotated[Path, typer.Option("--out", help="Folder for --emit.")] = Path("simtune-launch"),
    screen_requests: Annotated[int, typer.Option(min=1, help="Requests each candidate is screened on.")] = 300,
) -> None:
    """Find the best static deployment and the best re-sharding one, and their ratio."""
    from executor.launch.serving import ENGINES, emit_serving_configs
    from tuner.serving import tune_serving

    engines = _engines(emit, ENGINES)
    model_spec, cluster_spec, wl_spec = load_model(model), load_cluster(cluster), load_workload(workload)
    with SearchProgress() as progress:
        result = tune_serving(model_spec, cluster_spec, wl_spec, screen_requests=screen_requests,
                              progress=progress)
    if engines and result.static:
        files = emit_serving_configs(model_spec, cluster_spec, result.static.deployment, engines, out_dir)
        for f in files:
            err.print(f"wrote {escape(str(f.path))}")
        for engine, sentence in dict.fromkeys((f.engine, s) for f in files for s in f.approximations):
            err.print(Text(f"warning: {engine}: {sentence}", style="yellow"), soft_wrap=True)
    if as_json:
        print_json(result.to_dict())
        return
    out.print(f"[bold]{escape(model_spec.name)}[/] on [bold]{escape(cluster_spec.name)}[/] "
              f"({cluster_spec.num_devices} x {escape(cluster_spec.device.name)}); workload "
              f"{escape(_workload_summary(wl_spec))}", soft_wrap=True)
    out.print(_serving_comparison_table(result))
    s = result.search
    out.print(f"searched {s['evaluated']:,} deployments ({s['infeasible']:,} pruned) in {s['seconds']:.1f} s, "
              f"each screened on {s['screen_requests']:,} requests")
    for p in result.pruned[:5]:
        out.print(Text(f"pruned {p['deployment']}: {p['reason']}", style="dim"), soft_wrap=True)


# --- tune spec ----------------------------------------------------------------------------

def write_figure(fig: Any, path: Path) -> None:
    """Save a matplotlib figure atomically (a temporary file beside it, then os.replace)."""
    import os
    import tempfile

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix or ".png")
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=120, bbox_inches="tight")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _int_list(text: str, option: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise SpecError(option, text, "must be comma-separated integers, e.g. 1,2,4,8") from None
    if not values or min(values) < 1:
        raise SpecError(option, text, "needs at least one batch size, each >= 1")
    return values


def _policy_table(result: Any) -> Table:
    t = result.table
    table = _table(f"speculation length by batch size (best single k = {t.best_fixed_k})",
                   "batch size", "k*", "tokens/s", "vs no spec", f"vs k={t.best_fixed_k}")
    for r in t.rows:
        table.add_row(f"{r.batch_size:,}", str(r.k), f"{r.tokens_per_s:,.1f}", f"{r.speedup:.2f}x",
                      f"{r.speedup_over_fixed:.2f}x")
    return table


def _policy_runs_table(result: Any) -> Table:
    table = _table("policies on the workload (serving simulator)", "policy", "output tok/s", "vs none",
                   "TTFT p50 ms", "TPOT p50 ms", "mean k", "acceptance")
    base = result.runs["none"].output_tokens_per_s
    for name, rep in result.runs.items():
        spec = rep.speculation or {}
        acc = spec.get("acceptance_rate")
        table.add_row(name, f"{rep.output_tokens_per_s:,.1f}", f"{rep.output_tokens_per_s / base:.2f}x",
                      f"{rep.ttft_s['p50'] * 1e3:,.1f}", f"{rep.tpot_s['p50'] * 1e3:,.2f}",
                      f"{spec.get('mean_k', 0):.2f}", "-" if acc is None else f"{acc:.2f}")
    return table


@tune_app.command("spec")
@handles_errors
def tune_spec(
    target: Annotated[str | None, typer.Option("--target", "-m", help="Target model: name or YAML.")] = None,
    draft: Annotated[str | None, typer.Option(help="Draft model (same tokenizer) or 'ngram'.")] = None,
    cluster: Annotated[str | None, typer.Option("--cluster", "-c", help="Cluster: name, NxNODE or YAML.")] = None,
    acceptance: Annotated[float | None, typer.Option(help="Per-token acceptance rate, in (0, 1).")] = None,
    acceptance_trace: Annotated[Path | None, typer.Option(
        help="Per-request acceptance rates: CSV with an 'acceptance' column, or JSON.")] = None,
    batch_sizes: Annotated[str, typer.Option(help="Comma-separated batch sizes.")] = "1,2,4,8,16,32,64,128,256",
    k_max: Annotated[int, typer.Option(min=0, max=32, help="Largest speculation length considered.")] = 8,
    context: Annotated[float | None, typer.Option(min=1, help="Context tokens per sequence "
                                                  "(default: the workload's mean, else 512).")] = None,
    tp: Annotated[int | None, typer.Option(min=1, help="Target tensor parallel degree "
                                           "(default: the fewest GPUs that hold it).")] = None,
    engine: Annotated[str | None, typer.Option(help="Engine profile (simtune catalog --kind engines).")] = None,
    workload: Annotated[str | None, typer.Option("--workload", "-w", help="Also simulate each policy on it.")] = None,
    profile: Annotated[Path | None, typer.Option(
        help="A measured step-cost profile (benchmarks/bench_speculative.py output) instead of the model.")] = None,
    plot: Annotated[Path | None, typer.Option(help="Write the speedup-by-k plot (PNG).")] = None,
    as_json: JsonFlag = False,
    emit: Annotated[str | None, typer.Option(metavar="ENGINES", help="Write the vLLM launch script: vllm.")] = None,
    out_dir: Annotated[Path, typer.Option("--out", help="Folder for --emit.")] = Path("simtune-launch"),
) -> None:
    """The best speculation length for each batch size, and each policy on a workload."""
    from tuner.speculation import read_acceptance_trace, tune_speculation

    engines = _engines(emit, ("vllm",))
    if acceptance is not None and acceptance_trace is not None:
        raise SpecError("acceptance", acceptance, "give --acceptance or --acceptance-trace, not both")
    acc = read_acceptance_trace(acceptance_trace) if acceptance_trace else acceptance
    measured = json.loads(profile.read_text()) if profile else None
    if measured is not None and engines:
        raise SpecError("emit", emit, "needs a target, draft and cluster, not a measured profile")
    with SearchProgress() as progress:
        result = tune_speculation(target, draft, cluster, acc, batch_sizes=_int_list(batch_sizes, "batch_sizes"),
                                  k_max=k_max, context=context, tp=tp, engine=engine, workload=workload,
                                  measurement=measured, progress=progress)
    if plot:
        import matplotlib

        matplotlib.use("Agg")
        ax = result.table.plot()
        write_figure(ax.figure, plot)
        err.print(f"wrote {escape(str(plot))}")
    if engines:
        from executor.launch.serving import emit_serving_configs

        files = emit_serving_configs(load_model(target), load_cluster(cluster), result.deployment, engines, out_dir)
        for f in files:
            err.print(f"wrote {escape(str(f.path))}")
        for engine_name, sentence in dict.fromkeys((f.engine, s) for f in files for s in f.approximations):
            err.print(Text(f"warning: {engine_name}: {sentence}", style="yellow"), soft_wrap=True)
    if as_json:
        print_json(result.to_dict())
        return
    what = "measured profile" if measured else f"{target} + draft {draft} on {cluster}"
    out.print(f"[bold]{escape(what)}[/], context {result.table.context:,.0f} tokens", soft_wrap=True)
    out.print(_policy_table(result))
    if result.search.get("batch_sizes_dropped"):
        out.print(f"batch sizes {', '.join(map(str, result.search['batch_sizes_dropped']))} left out: the KV "
                  f"cache holds {result.search['max_batch_in_kv']:,} sequences at this context")
    if result.runs:
        out.print(_policy_runs_table(result))


# --- validate train | serve ----------------------------------------------------------------

StrictFlag = Annotated[
    bool, typer.Option("--strict", help="Exit 1 if any group with a target misses it.")
]


def _quantity(row: dict[str, Any]) -> str:
    quantity, unit = str(row.get("quantity", "")), row.get("unit")
    return f"{quantity} ({unit})" if unit and unit not in quantity else quantity


def _error_cell(error: Any, target: float | None) -> Text:
    if not isinstance(error, (int, float)):
        return Text("n/a")
    missed = target is not None and abs(error) > target
    return Text(f"{error:+.1%}", style="red" if missed else "")


def _validation_tables(rows: list[dict[str, Any]], summary: dict[str, dict[str, Any]]
                       ) -> tuple[list[Table], list[str]]:
    """One predicted-vs-measured table per group, and the cited sources they point to."""
    sources = list(dict.fromkeys(str(r.get("source", "")) for r in rows))
    groups = list(dict.fromkeys(r.get("group", "rows") for r in rows))
    tables = []
    for group in groups:
        target = summary.get(group, {}).get("target", math.inf)
        table = _table(f"{group}: predicted vs measured", "row", "quantity", "predicted",
                       "measured", "error", "src", numeric_from=2)
        table.columns[1].justify = "left"
        for r in (r for r in rows if r.get("group", "rows") == group):
            ref = sources.index(str(r.get("source", ""))) + 1
            table.add_row(escape(str(r.get("id", r.get("name", "")))), escape(_quantity(r)),
                          fmt_number(r.get("predicted")), fmt_number(r.get("measured")),
                          _error_cell(r.get("error"), target), escape(f"[{ref}]"))
        tables.append(table)
    return tables, sources


def _validation_notes(rows: list[dict[str, Any]], group: str) -> list[str]:
    """One line per row of `group` that carries a note (what the model assumes for it)."""
    return [f"  {escape(str(r.get('id', '')))}: {escape(str(r['note']))}"
            for r in rows if r.get("group", "rows") == group and r.get("note")]


def _verdict(passed: bool | None) -> Text:
    if passed is None:
        return Text("-")  # a group without a target is reported, never judged
    return Text("PASS", style="green") if passed else Text("FAIL", style="bold red")


def _validation_summary_table(summary: dict[str, dict[str, Any]], error_key: str,
                              error_header: str) -> Table:
    """n, the group's error statistic (`error_key`, e.g. mae), max, target and verdict."""
    table = _table("summary", "group", "n", error_header, "max", "target", "result")
    for group, s in summary.items():
        worst = f"{s['max']:.1%}" if "max" in s else ""
        target = "-" if s.get("target") is None else f"≤ {s['target']:.0%}"
        table.add_row(escape(group), str(s.get("n", "")), f"{s[error_key]:.1%}", worst, target,
                      _verdict(s.get("passed")))
    return table


def report_validation(result: Any, as_json: bool, strict: bool, error_key: str,
                      error_header: str) -> None:
    """Print a ValidationResult (tables or JSON); with `strict`, exit 1 if a group failed."""
    if as_json:
        print_json(result.to_dict())
    else:
        tables, sources = _validation_tables(result.rows, result.summary)
        groups = list(dict.fromkeys(r.get("group", "rows") for r in result.rows))
        for group, table in zip(groups, tables):
            out.print(table)
            for note in _validation_notes(result.rows, group):
                out.print(note)
        for i, source in enumerate(sources, 1):
            out.print(f"\\[{i}] {escape(source)}")
        out.print(_validation_summary_table(result.summary, error_key, error_header))
    failed = [g for g, s in result.summary.items() if s.get("passed") is False]
    if strict and failed:
        err.print(Text(f"failed: {', '.join(failed)}", style="bold red"))
        raise typer.Exit(EXIT_CHECK_FAILED)


@validate_app.command("train")
@handles_errors
def validate_train(as_json: JsonFlag = False, strict: StrictFlag = False) -> None:
    """Predict the published training measurements and report the errors per group."""
    # Imported here so that the other commands never depend on the validation data.
    from simulator.validation import validate_training

    err.print("validating training predictions against published measurements ...")
    report_validation(validate_training(), as_json, strict, "mae", "MAE")


@validate_app.command("serve")
@handles_errors
def validate_serve(as_json: JsonFlag = False, strict: StrictFlag = False) -> None:
    """Predict the published serving measurements (throughput, TTFT, TPOT) per group."""
    from simulator.validation_serving import validate_serving

    err.print("validating serving predictions against published measurements ...")
    report_validation(validate_serving(), as_json, strict, "median_abs_error", "median abs error")


if __name__ == "__main__":
    app()
