"""`simtune catalog`: the named specs of every kind, with the key fields of each."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from simtune.cli.render import (
    JsonFlag,
    _arrival,
    _schedule,
    _table,
    _tokens,
    handles_errors,
    out,
    print_json,
)
from simulator.specs.catalog import (
    catalog_names,
    load_cluster,
    load_deployment,
    load_device,
    load_engine,
    load_gnn_model,
    load_gnn_plan,
    load_graph,
    load_model,
    load_plan,
    load_workload,
)


class Kind(StrEnum):
    devices = "devices"
    clusters = "clusters"
    models = "models"
    plans = "plans"
    deployments = "deployments"
    workloads = "workloads"
    engines = "engines"
    graphs = "graphs"
    gnn_models = "gnn_models"
    gnn_plans = "gnn_plans"


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


def _layout(layout: dict[str, int]) -> str:
    return f"tp{layout['tp']} pp{layout['pp']}"


CATALOG: dict[str, tuple[Callable[[str], Any], list[Column]]] = {
    "devices": (load_device, [
        Column("full_name", "device", lambda d: d.name, numeric=False),
        Column("peak_bf16_tflops", "bf16 TFLOP/s", lambda d: d.peak_flops / 1e12, "{:,.4g}".format),
        Column("memory_GiB", "memory GiB", lambda d: d.memory_GiB, "{:g}".format),
        Column("hbm_bandwidth_GBps", "HBM GB/s", lambda d: d.hbm_bandwidth_GBps, "{:,.0f}".format),
        Column("source", "source", _device_source, numeric=False),
    ]),
    "clusters": (load_cluster, [
        Column("num_nodes", "nodes", lambda c: c.num_nodes),
        Column("devices_per_node", "per node", lambda c: c.devices_per_node),
        Column("device", "device", lambda c: c.device.name, numeric=False),
        Column("intra_node_bandwidth_GBps", "intra GB/s", lambda c: c.intra_node_bandwidth_GBps,
               "{:.4g}".format),
        Column("inter_node_bandwidth_GBps", "inter GB/s", lambda c: c.inter_node_bandwidth_GBps,
               "{:.4g}".format),
        Column("intra_node_link", "link", lambda c: c.intra_node_link, numeric=False),
        Column("profile", "profile", lambda c: c.profile or "-", numeric=False),
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
    "graphs": (load_graph, [
        Column("num_nodes", "nodes", lambda g: g.num_nodes, "{:,}".format),
        Column("num_edges", "edges (stored)", lambda g: g.num_edges, "{:,}".format),
        Column("feature_dim", "features", lambda g: g.feature_dim),
        Column("num_classes", "classes", lambda g: g.num_classes),
        Column("train_fraction", "train", lambda g: g.train_fraction, "{:.3g}".format),
        Column("described_by", "by", lambda g: "stats" if g.generated else "files", numeric=False),
    ]),
    "gnn_models": (load_gnn_model, [
        Column("architecture", "architecture", lambda m: m.architecture, numeric=False),
        Column("num_layers", "layers", lambda m: m.num_layers),
        Column("hidden_size", "hidden", lambda m: m.hidden_size),
        Column("fanouts", "fan-outs", lambda m: list(m.fanouts), lambda f: ",".join(map(str, f)), numeric=False),
    ]),
    "gnn_plans": (load_gnn_plan, [
        Column("partition", "partition", lambda p: p.partition, numeric=False),
        Column("trainers_per_machine", "trainers", lambda p: p.trainers_per_machine),
        Column("samplers_per_trainer", "samplers", lambda p: p.samplers_per_trainer),
        Column("batch_size_per_trainer", "batch", lambda p: p.batch_size_per_trainer, "{:,}".format),
        Column("feature_placement", "features", lambda p: p.feature_placement, numeric=False),
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

@handles_errors
def catalog(
    kind: Annotated[Kind | None, typer.Option(help="Only this kind of spec.")] = None,
    as_json: JsonFlag = False,
) -> None:
    """List the named specs: devices, clusters, models, training plans, serving deployments,
    workloads, engines, graphs, GNN models and GNN plans."""
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
