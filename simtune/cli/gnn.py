"""`simtune partition`: split a graph across machines and write the partition store.

Thin: load the graph spec, build or read the graph, call `simulator.gnn.partition_graph`,
optionally write `simulator.gnn.store`'s layout (and DGL's config), render the quality.
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from simtune.cli.render import JsonFlag, _table, err, handles_errors, out, print_json
from simulator.errors import SpecError


class Method(StrEnum):
    metis = "metis"
    random = "random"
    metis_balanced = "metis-balanced"


@handles_errors
def partition(
    graph: Annotated[str, typer.Option("--graph", "-g", help="Graph: catalog name or YAML path.")],
    parts: Annotated[int, typer.Option("--parts", "-n", help="Number of parts (machines), >= 1.")],
    method: Annotated[Method, typer.Option(help="metis (min edge cut), random, or metis-balanced "
                                                "(training nodes, edges and nodes balanced).")] = Method.metis,
    out_dir: Annotated[Path | None, typer.Option("--out", help="Write the partition store here.")] = None,
    emit: Annotated[str | None, typer.Option("--emit", help="Also write DGL's partition config: dgl.")] = None,
    seed: Annotated[int, typer.Option(min=0, max=2**31 - 1, help="Seed of METIS and of random partitioning.")] = 0,
    as_json: JsonFlag = False,
) -> None:
    """Partition a graph: edge cut, halo nodes and balance per part; --out writes the store."""
    from simulator.gnn.graph import build_graph
    from simulator.gnn.partition import BALANCE_TOLERANCE, partition_graph
    from simulator.gnn.store import write_partition

    if emit not in (None, "dgl"):
        raise SpecError("--emit", emit, "the only partition format to emit is 'dgl'")
    if emit and out_dir is None:
        raise SpecError("--emit", emit, "needs --out DIR to write into")
    if parts < 1:
        raise SpecError("--parts", parts, "must be >= 1")
    g = build_graph(graph)
    result = partition_graph(g, parts, method.value, seed=seed)
    report = {"graph": g.name, "num_nodes": g.num_nodes, "num_edges": g.num_edges, **result.to_dict()}
    if out_dir is not None:
        report["out"] = str(write_partition(out_dir, g, result, emit_dgl=emit == "dgl").parent)
        err.print(f"partition written to {escape(report['out'])}")
    if as_json:
        print_json(report)
        return
    out.print(f"[bold]{escape(g.name)}[/]: {g.num_nodes:,} nodes, {g.num_edges:,} edges into {parts} parts "
              f"by {method.value} in {result.seconds:.2f} s", soft_wrap=True)
    out.print(f"edge cut: {result.edge_cut:,} edges ({result.edge_cut_fraction:.1%})")
    table = _table("per part", "part", "owned nodes", "in-edges", "train nodes", "halo nodes")
    for p in range(parts):
        table.add_row(str(p), *(f"{result.loads[k][p]:,}" for k in ("nodes", "edges", "train_nodes")),
                      f"{result.halo[p].size:,}")
    out.print(table)
    balance = _table("balance", "constraint", "largest / mean part")
    for k, v in result.balance.items():
        balance.add_row(k, f"{v:.3f}")
    out.print(balance)
    if method == Method.metis_balanced:
        out.print(f"metis-balanced bounds every constraint at {1 + BALANCE_TOLERANCE:.2f}")
