"""Reading a sweep table: ranking by time or cost, the best scenario per group, the Pareto front
of time vs cost, and two figures (the front, and a heat map over two axes).

Only rows with status `ok` are ranked. The time and cost columns are the command's (see
`tuner.sweep.commands`): for `simulate train` the iteration time and the cost per million
training tokens. A scenario is on the Pareto front when no other scenario is at least as fast
and at least as cheap, and strictly better in one of the two.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from simulator.errors import SpecError

RANK_BY = ("time", "cost")


def metric(spec: Any, by: str) -> str:
    """The column `by` ('time' or 'cost') ranks on for the spec's command."""
    if by not in RANK_BY:
        raise SpecError("--rank-by", by, f"must be one of {', '.join(RANK_BY)}")
    col = spec.cmd.time_column if by == "time" else spec.cmd.cost_column
    if col is None:
        raise SpecError("--rank-by", by, f"`{spec.command}` reports no single {by} to rank by")
    return col


def ok_rows(df: pd.DataFrame, *columns: str) -> pd.DataFrame:
    """Rows that ran and report every column in `columns` (cost is missing without a price)."""
    ok = df[df["status"] == "ok"]
    for col in columns:
        ok = ok[ok[col].notna()] if col in ok else ok.iloc[0:0]
    return ok


def ranked(df: pd.DataFrame, spec: Any, by: str = "time") -> pd.DataFrame:
    col = metric(spec, by)
    rows = ok_rows(df, col)
    return rows.sort_values([col, "scenario_id"], kind="stable") if col in rows else rows  # none ran: no column


def best_per_group(df: pd.DataFrame, spec: Any, group: list[str], by: str = "time") -> pd.DataFrame:
    """The best-ranked scenario of each combination of the `group` columns."""
    unknown = [g for g in group if g not in df]
    if unknown:
        raise SpecError("--group-by", unknown[0], f"is not a column; the axes are {', '.join(spec.axes)}")
    rows = ranked(df, spec, by)
    return rows.groupby(group, sort=True, dropna=False).head(1).sort_values(group, kind="stable")


def pareto_front(df: pd.DataFrame, time_col: str, cost_col: str) -> pd.DataFrame:
    """The rows no other row beats on both columns (both minimised), sorted by time."""
    rows = ok_rows(df, time_col, cost_col).sort_values([time_col, cost_col, "scenario_id"], kind="stable")
    keep, best_cost = [], np.inf
    for i, cost in zip(rows.index, rows[cost_col]):
        if cost < best_cost:  # each faster row was dearer: this one is not dominated
            keep.append(i)
            best_cost = cost
    return rows.loc[keep]


def label(row: pd.Series, spec: Any) -> str:
    return " ".join(f"{row[a]}" for a in spec.axes)


def plot_front(df: pd.DataFrame, spec: Any, ax=None):
    """Every scenario that ran, time vs cost, with the Pareto front drawn and labelled."""
    import matplotlib.pyplot as plt

    t, c = metric(spec, "time"), metric(spec, "cost")
    ax = ax or plt.subplots(figsize=(7, 4.5))[1]
    rows, front = ok_rows(df, t, c), pareto_front(df, t, c)
    ax.scatter(rows[t], rows[c], s=10, alpha=0.4, label=f"{len(rows):,} scenarios")
    ax.plot(front[t], front[c], "o-", color="C3", label=f"Pareto front ({len(front)})")
    for _, r in front.head(12).iterrows():
        ax.annotate(label(r, spec), (r[t], r[c]), fontsize=6, xytext=(3, 3), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(t)
    ax.set_ylabel(c)
    ax.legend(fontsize=8)
    return ax


def heat(df: pd.DataFrame, x: str, y: str, value: str) -> pd.DataFrame:
    """The best (smallest) `value` of each (y, x) cell over the other axes; NaN where none ran ok."""
    rows = ok_rows(df, value)
    grid = rows.groupby([y, x])[value].min().unstack(x)
    order_x = [v for v in pd.unique(df[x]) if v in grid.columns]
    order_y = [v for v in pd.unique(df[y]) if v in grid.index]
    return grid.reindex(index=order_y, columns=order_x)


def plot_heatmap(df: pd.DataFrame, x: str, y: str, value: str, ax=None):
    """A heat map of `heat(...)`, each cell annotated; blank cells: nothing fits or ran."""
    import matplotlib.pyplot as plt

    grid = heat(df, x, y, value)
    ax = ax or plt.subplots(figsize=(1.1 * max(4, grid.shape[1]) + 2, 0.5 * max(4, grid.shape[0]) + 1.5))[1]
    data = grid.to_numpy(dtype=float)
    im = ax.imshow(np.ma.masked_invalid(data), aspect="auto", cmap="viridis_r")
    ax.set_xticks(range(grid.shape[1]), [str(v) for v in grid.columns], rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(grid.shape[0]), [str(v) for v in grid.index], fontsize=8)
    for (i, j), v in np.ndenumerate(data):
        if np.isfinite(v):  # dark text on the light (small) end of the reversed map
            ax.text(j, i, f"{v:.3g}", ha="center", va="center", fontsize=6, color="k" if im.norm(v) < 0.5 else "w")
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    ax.figure.colorbar(im, ax=ax, label=f"best {value}")
    return ax


def largest_fitting(df: pd.DataFrame, index: str, columns: str, along: str) -> pd.DataFrame:
    """For each (index, columns) cell, the largest value of `along` whose scenario ran and fits
    (status ok); NaN where none fits. Where a configuration stops fitting is one step past it."""
    rows = df[df["status"] == "ok"]
    grid = rows.groupby([index, columns])[along].max().unstack(columns)
    order_i = [v for v in pd.unique(df[index])]
    order_c = [v for v in pd.unique(df[columns])]
    return grid.reindex(index=order_i, columns=order_c)
