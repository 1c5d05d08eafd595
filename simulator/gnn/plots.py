"""Tables and figures of distributed GNN training, for notebooks/gnn.ipynb.

- `partition_quality`: edge cut, halo nodes per owned node and the balance of each constraint,
  per partitioning method, measured on a graph (`plot_partition_quality` draws it);
- `epoch_vs_machines`: the simulated epoch as the cluster grows, per partitioning method;
- `breakdown_bars`: the critical-path breakdown of one iteration of several reports, stacked;
- `measured_vs_simulated`: the executor benchmark's measured epochs next to the simulator's
  predictions (benchmarks/results/gnn_executor.json), or None when the file does not exist;
- `save_figure`: write a figure atomically (a temporary file beside the target, then rename),
  as every simtune output is written (`simulator.files`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from simulator.files import atomic_path
from simulator.gnn.graph import Graph
from simulator.gnn.partition import METHODS, partition_graph
from simulator.gnn.quality import quality_of
from simulator.gnn.report import BREAKDOWN_KEYS, GNNReport
from simulator.gnn.simulate import simulate_gnn

COLORS = {"sample": "tab:blue", "fetch_local": "tab:cyan", "fetch_remote": "tab:orange", "compute": "tab:green",
          "h2d_copy": "tab:olive", "allreduce": "tab:purple", "sparse_update": "tab:brown", "stall": "tab:gray",
          "serve": "tab:red"}


def save_figure(fig, path: str | os.PathLike, **kwargs: Any) -> Path:
    """Save `fig` to `path` through a temporary file in the same folder and os.replace."""
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, **{"format": path.suffix[1:] or "png", **kwargs})
    return path


def partition_quality(graph: Graph, parts: int, methods: Sequence[str] = METHODS):
    """One row per method: edge cut, halo per owned node, balance of nodes/edges/training nodes."""
    import pandas as pd

    rows = []
    for method in methods:
        part = partition_graph(graph, parts, method)
        q = quality_of(graph, part)
        rows.append({"method": method, "edge_cut_fraction": q.edge_cut_fraction, "halo_per_owned": q.halo_per_owned,
                     **{f"balance_{k}": v for k, v in q.balance.items()}, "seconds": part.seconds})
    return pd.DataFrame(rows).set_index("method")


def plot_partition_quality(table, ax=None):
    """Bars of edge cut and halo per owned node, and of every constraint's balance, per method."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(1, 2, figsize=(10, 3.5))
    table[["edge_cut_fraction", "halo_per_owned"]].plot.bar(ax=ax[0], rot=0)
    ax[0].set_title("cut and halo (lower is better)")
    table[[c for c in table.columns if c.startswith("balance_")]].plot.bar(ax=ax[1], rot=0)
    ax[1].axhline(1.0, color="black", lw=0.8)
    ax[1].set_ylim(0.9, max(1.2, float(table.filter(like="balance_").to_numpy().max()) * 1.05))
    ax[1].set_title("balance: largest part / mean part")
    return ax


def epoch_vs_machines(graph: Any, model: Any, node: str, plan: Mapping[str, Any], machines: Sequence[int],
                      methods: Sequence[str] = ("metis-balanced", "random"), ax=None):
    """Simulated epoch time on `N x node` for each N and method; returns a DataFrame (N x method)."""
    import matplotlib.pyplot as plt
    import pandas as pd

    table = pd.DataFrame({m: [simulate_gnn(graph, model, f"{n}x{node}", {**plan, "partition": m}).epoch_time_s
                              for n in machines] for m in methods}, index=pd.Index(list(machines), name="machines"))
    if ax is None:
        _, ax = plt.subplots(figsize=(5, 3.5))
    table.plot(ax=ax, marker="o", logx=True, logy=True)
    ideal = table.iloc[0, 0] * table.index[0] / table.index.to_numpy()
    ax.plot(table.index, ideal, "k:", lw=0.8, label="linear")
    ax.set_xticks(list(machines), [str(n) for n in machines])
    ax.set_ylabel("epoch (s)")
    ax.legend()
    return table


def breakdown_bars(reports: Mapping[str, GNNReport], ax=None):
    """Stacked bars of each report's iteration breakdown (ms); returns the DataFrame."""
    import matplotlib.pyplot as plt
    import pandas as pd

    table = pd.DataFrame({label: {k: r.breakdown.get(k, 0.0) * 1e3 for k in BREAKDOWN_KEYS}
                          for label, r in reports.items()}).T
    table = table.loc[:, (table > 0).any()]
    if ax is None:
        _, ax = plt.subplots(figsize=(7, 3.5))
    table.plot.barh(stacked=True, ax=ax, color=[COLORS[c] for c in table.columns])
    ax.set_xlabel("ms per iteration (critical path)")
    ax.invert_yaxis()
    return table


def measured_vs_simulated(path: str | os.PathLike):
    """The executor benchmark's rows (measured median, min, max, predicted, error), or None when
    `path` does not exist."""
    import pandas as pd

    path = Path(path)
    if not path.exists():
        return None
    data = json.loads(path.read_text())
    rows = []
    for r in data.get("rows", []):
        measured, predicted = r["epoch_time_s"], r.get("predicted_epoch_time_s")
        rows.append({"run": r.get("label", ""), "partition": r.get("partition"), "measured_s": measured["median"],
                     "min_s": measured.get("min"), "max_s": measured.get("max"), "predicted_s": predicted,
                     "error": (predicted - measured["median"]) / measured["median"] if predicted else None})
    return pd.DataFrame(rows).set_index("run")


def plot_measured_vs_simulated(table, ax=None):
    """Measured epochs (median, with the min-max spread) and the predictions, per run."""
    import matplotlib.pyplot as plt
    import numpy as np

    if ax is None:
        _, ax = plt.subplots(figsize=(6, 3.5))
    x = np.arange(len(table))
    spread = [table["measured_s"] - table["min_s"], table["max_s"] - table["measured_s"]]
    ax.bar(x - 0.2, table["measured_s"], 0.4, yerr=spread, capsize=3, label="measured (median, min-max)")
    ax.bar(x + 0.2, table["predicted_s"], 0.4, label="simulated")
    ax.set_xticks(x, list(table.index))
    ax.set_ylabel("epoch (s)")
    ax.legend()
    return ax
