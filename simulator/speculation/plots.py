"""Tables and plots of speculative decoding for notebooks and the README.

`measured_table` and `model_vs_measured` read the JSON that `benchmarks/bench_speculative.py`
writes (a real model on a real machine); `leviathan_check` sets the simulator's batch-1
speedups beside the closed form of Leviathan et al.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from simulator.specs.serving import AcceptanceSpec
from simulator.speculation.measured import compare_with_measurement, policy_table_of_measurement
from simulator.speculation.model import StepCost, policy_table, step_s


def measured_table(results: dict[str, Any], value: str = "speedup") -> pd.DataFrame:
    """Batch size x k of the measured grid: output tokens/s, or the speedup over k = 0."""
    grid = pd.DataFrame(results["grid"])
    table = grid.pivot(index="batch_size", columns="k", values="output_tokens_per_s")
    return table.div(table[0], axis=0) if value == "speedup" else table


def model_vs_measured(results: dict[str, Any]) -> pd.DataFrame:
    """Per batch size: the model's k*, the measured best k, and how much the model's choice
    loses against the measured best (1.0 = none)."""
    df = pd.DataFrame(compare_with_measurement(results)).set_index("batch_size")
    df["model_choice_vs_best"] = df["measured_at_model_k_tokens_per_s"] / df["measured_best_tokens_per_s"]
    if df["adaptive_tokens_per_s"].notna().any():
        df["adaptive_vs_best_fixed"] = df["adaptive_tokens_per_s"] / df["measured_best_tokens_per_s"]
    return df


def plot_model_vs_measured(results: dict[str, Any], axes=None):
    """Speedup over k = 0 against k, measured (markers) and predicted (lines), per batch size."""
    import matplotlib.pyplot as plt

    if axes is None:
        _, axes = plt.subplots(1, 2, figsize=(11, 3.8), sharey=True)
    measured = measured_table(results)
    table = policy_table_of_measurement(results)
    cmap = plt.get_cmap("plasma", len(measured.index) + 1)
    for i, b in enumerate(measured.index):
        axes[0].plot(measured.columns, measured.loc[b], "o-", color=cmap(i), label=f"b={b}")
        row = next((r for r in table.rows if r.batch_size == b), None)
        if row is not None:
            pred = np.array(row.tokens_per_s_by_k) / row.tokens_per_s_by_k[0]
            axes[1].plot(range(len(pred)), pred, "-", color=cmap(i), label=f"b={b}")
            axes[1].plot(row.k, row.speedup, "k*", ms=9)
        best = measured.loc[b].idxmax()
        axes[0].plot(best, measured.loc[b, best], "k*", ms=9)
    for ax, title in zip(axes, ("measured", "predicted from the measured step costs")):
        ax.axhline(1.0, color="grey", lw=0.5)
        ax.set_xlabel("speculation length k")
        ax.set_title(f"{title} (stars: best k)")
    axes[0].set_ylabel("throughput / no speculation")
    axes[1].legend(fontsize=7, ncol=2)
    return axes


def leviathan_check(cost: StepCost, acceptance: float, k_max: int = 8, context: float = 512.0) -> pd.DataFrame:
    """Batch 1: the simulator's speedup per k beside Leviathan et al.'s closed form
    S(k) = (1 - a^(k+1)) / ((1 - a)(k c + 1)), c = draft step / target step. The two agree
    exactly when verifying k + 1 tokens costs one target step; the gap is the extra cost of
    the k drafted tokens in the target (attention and the LM head over k + 1 positions)."""
    acc = AcceptanceSpec(mean=acceptance)
    table = policy_table(cost, acc, [1], k_max, context)
    base = step_s(cost, 1, 0, context)
    c = cost.draft_s(1, context) / base
    a = acceptance
    rows = []
    for k, tput in enumerate(table.rows[0].tokens_per_s_by_k):
        closed = (1 - a ** (k + 1)) / ((1 - a) * (k * c + 1))
        rows.append({"k": k, "simulated": tput / table.rows[0].tokens_per_s_by_k[0], "leviathan": closed,
                     "verify_cost_over_step": cost.target_s(1, k + 1, context) / cost.target_s(1, 1, context)})
    return pd.DataFrame(rows).set_index("k")
