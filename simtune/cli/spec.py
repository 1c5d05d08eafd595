"""`simtune tune spec`: the best speculation length for each batch size, and each policy
(none, fixed, adaptive, goodput) simulated on a workload, or the table from step costs
measured on a real machine (`--profile`: a profile directory or a speculative benchmark's JSON)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from simtune.cli.apps import tune_app
from simtune.cli.render import (
    JsonFlag,
    SearchProgress,
    _engines,
    _int_list,
    _table,
    err,
    handles_errors,
    out,
    print_json,
    print_written,
    write_figure,
)
from simulator.errors import SpecError
from simulator.specs.catalog import load_cluster, load_model


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
        help="Per-request acceptance rates: CSV with an 'acceptance' column, a JSON list, or a speculative "
             "benchmark's JSON (e.g. benchmarks/results/speculative_serving_cpu.json).")] = None,
    batch_sizes: Annotated[str, typer.Option(help="Comma-separated batch sizes.")] = "1,2,4,8,16,32,64,128,256",
    k_max: Annotated[int, typer.Option(min=0, max=32, help="Largest speculation length considered.")] = 8,
    context: Annotated[float | None, typer.Option(min=1, help="Context tokens per sequence "
                                                  "(default: the workload's mean, else 512).")] = None,
    tp: Annotated[int | None, typer.Option(min=1, help="Target tensor parallel degree "
                                           "(default: the fewest GPUs that hold it).")] = None,
    engine: Annotated[str | None, typer.Option(help="Engine profile (simtune catalog --kind engines).")] = None,
    workload: Annotated[str | None, typer.Option("--workload", "-w", help="Also simulate each policy on it.")] = None,
    profile: Annotated[Path | None, typer.Option(
        help="Measured step costs instead of the model: a profile directory written by `simtune profile` "
             "(its decode table; give --acceptance or --acceptance-trace too, it holds no acceptance rates) "
             "or a speculative benchmark's JSON (benchmarks/results/speculative_*.json: step costs and "
             "acceptance). --context picks the measured context nearest it.")] = None,
    workload_class: Annotated[str | None, typer.Option(
        help="The workload class whose acceptance rates a continuous-batching benchmark JSON supplies "
             "(its 'classes': code, mixed); default: the first in the file.")] = None,
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
    acc = read_acceptance_trace(acceptance_trace, workload_class) if acceptance_trace else acceptance
    if profile is not None and engines:
        raise SpecError("emit", emit, "needs a target, draft and cluster, not a measured profile")
    with SearchProgress() as progress:
        result = tune_speculation(target, draft, cluster, acc, batch_sizes=_int_list(batch_sizes, "batch_sizes"),
                                  k_max=k_max, context=context, tp=tp, engine=engine, workload=workload,
                                  measurement=profile, workload_class=workload_class, progress=progress)
    if plot:
        import matplotlib

        matplotlib.use("Agg")
        ax = result.table.plot()
        write_figure(ax.figure, plot)
        err.print(f"wrote {escape(str(plot))}")
    if engines:
        from executor.launch.serving import emit_serving_configs

        print_written(emit_serving_configs(load_model(target), load_cluster(cluster), result.deployment, engines,
                                           out_dir))
    if as_json:
        print_json(result.to_dict())
        return
    if profile is not None:
        what = (f"measured step costs of {profile} (acceptance: {result.search['acceptance_from']}), "
                f"measured at context {result.table.context:,.0f} tokens")
    else:
        what = f"{target} + draft {draft} on {cluster}, context {result.table.context:,.0f} tokens"
    out.print(f"[bold]{escape(what)}[/]", soft_wrap=True)
    out.print(_policy_table(result))
    if result.search.get("batch_sizes_dropped"):
        out.print(f"batch sizes {', '.join(map(str, result.search['batch_sizes_dropped']))} left out: the KV "
                  f"cache holds {result.search['max_batch_in_kv']:,} sequences at this context")
    if result.runs:
        out.print(_policy_runs_table(result))
