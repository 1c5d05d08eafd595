"""Measured vs simulated serving, as tables and figures: benchmarks/results/serving_vs_sim.json.

`benchmarks/bench_serving_vs_sim.py` runs the real engine (executor/serving) and the serving
simulator on the same requests and writes one JSON object; these helpers only read it (the
notebook never runs the engine):

- `comparison_table`: one row per deployment and metric (throughput, TTFT and TPOT p50/p90):
  measured median, min and max over the repeats, the simulator's value, the error
  (predicted / measured - 1) and whether it is within the benchmark's target;
- `plot_measured_vs_simulated`: one panel per metric, measured (bar, min-max whisker) beside
  simulated (hatched bar) for every deployment that was measured;
- `step_table` / `plot_steps`: per deployment and step kind, the seconds the engine spent in
  steps against the iteration model's seconds for the very same batches, and the CPU time
  rank 0's engine thread got in them (less than the wall time when the machine is shared);
- `plot_per_request`: each request's predicted TTFT and TPOT against its measured ones (the run
  of median throughput), with the target band: a percentile that misses while most points sit
  in the band is one whose requests split into two clusters (decodes a long prefill
  interrupted, or not) with a few requests on the other side of the split.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

METRICS = {  # key: (label, scale to the plotted unit)
    "output_tokens_per_s": ("output tokens/s", 1.0),
    "ttft_p50_s": ("TTFT p50 (s)", 1.0),
    "ttft_p90_s": ("TTFT p90 (s)", 1.0),
    "tpot_p50_s": ("TPOT p50 (ms)", 1e3),
    "tpot_p90_s": ("TPOT p90 (ms)", 1e3),
}


def load_result(path: str | Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text())


def measured_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The rows the engine ran (the others were only simulated; their `not_measured` says why)."""
    return [r for r in result["rows"] if "measured" in r]


def comparison_table(result: dict[str, Any]):
    """A DataFrame: deployment x metric -> measured (median, min, max), simulated, error, within target."""
    import pandas as pd

    rows = []
    for r in measured_rows(result):
        for key, (label, scale) in METRICS.items():
            m = r["measured"][key]
            rows.append({"deployment": r["label"], "metric": label, "measured": scale * m["median"],
                         "min": scale * m["min"], "max": scale * m["max"], "simulated": scale * r["simulated"][key],
                         "error": r["error"][key], "within target": r["within_target"][key]})
    return pd.DataFrame(rows).set_index(["deployment", "metric"])


def plot_measured_vs_simulated(result: dict[str, Any], axes=None):
    """One panel per metric: measured median (min-max whisker) and simulated, per deployment."""
    import matplotlib.pyplot as plt
    import numpy as np

    rows = measured_rows(result)
    if axes is None:
        axes = plt.subplots(1, len(METRICS), figsize=(3.2 * len(METRICS), 3.4))[1]
    x = np.arange(len(rows))
    for ax, (key, (label, scale)) in zip(axes, METRICS.items()):
        med = np.array([scale * r["measured"][key]["median"] for r in rows])
        lo = med - np.array([scale * r["measured"][key]["min"] for r in rows])
        hi = np.array([scale * r["measured"][key]["max"] for r in rows]) - med
        ax.bar(x - 0.2, med, 0.4, yerr=[lo, hi], capsize=3, label="measured", color="tab:blue")
        ax.bar(x + 0.2, [scale * r["simulated"][key] for r in rows], 0.4, label="simulated", color="white",
               edgecolor="tab:orange", hatch="//")
        ax.set_xticks(x, [r["label"] for r in rows], rotation=45, ha="right")
        ax.set_title(label)
    axes[0].legend()
    return axes


def plot_per_request(result: dict[str, Any], axes=None):
    """Predicted against measured TTFT and TPOT of every request, one colour per deployment,
    log axes, the diagonal and the latency target's band (results with per-request data)."""
    import matplotlib.pyplot as plt
    import numpy as np

    rows = [r for r in measured_rows(result) if "per_request" in r]
    axes = axes if axes is not None else plt.subplots(1, 2, figsize=(9, 4))[1]
    band = result["targets"]["latency"]
    for ax, key, label in zip(axes, ("ttft_s", "tpot_s"), ("TTFT (s)", "TPOT (s)")):
        lo, hi = np.inf, 0.0
        for r in rows:
            m = np.asarray(r["per_request"]["measured"][key])
            p = np.asarray(r["per_request"]["simulated"][key])
            ax.scatter(m, p, s=12, label=r["label"])
            lo, hi = min(lo, m.min(), p.min()), max(hi, m.max(), p.max())
        if rows:
            line = np.geomspace(lo, hi, 50)
            ax.plot(line, line, color="black", lw=0.8)
            ax.fill_between(line, line * (1 - band), line * (1 + band), color="grey", alpha=0.2,
                            label=f"within {band:.0%}")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(f"measured {label}")
        ax.set_ylabel(f"simulated {label}")
    axes[0].legend(fontsize=7)
    return axes


def step_table(result: dict[str, Any]):
    """A DataFrame: (deployment, step kind) -> steps, measured s, rank 0 CPU s, predicted s and ratios."""
    import pandas as pd

    rows = []
    for r in measured_rows(result):
        for kind, a in r.get("steps_measured_vs_predicted", {}).items():
            rows.append({"deployment": r["label"], "kind": kind, "steps": a["steps"], "mean sequences": a["mean_sequences"],
                         "measured s": a["measured_s"], "rank 0 CPU s": a["cpu_s"],
                         "rank 0 CPU share": a["cpu_s"] / a["measured_s"], "predicted s": a["predicted_s"],
                         "measured / predicted (median step)": a["median_measured_over_predicted"],
                         "CPU / predicted (median step)": a["median_cpu_over_predicted"]})
    return pd.DataFrame(rows).set_index(["deployment", "kind"])


def plot_steps(result: dict[str, Any], ax=None):
    """Seconds in engine steps per deployment and kind: measured wall, rank 0 CPU, predicted."""
    import matplotlib.pyplot as plt
    import numpy as np

    table = step_table(result)
    ax = ax or plt.subplots(figsize=(9, 3.2))[1]
    x = np.arange(len(table))
    for i, (col, color) in enumerate((("measured s", "tab:blue"), ("rank 0 CPU s", "tab:cyan"),
                                      ("predicted s", "tab:orange"))):
        ax.bar(x + (i - 1) * 0.27, table[col], 0.27, label=col, color=color)
    ax.set_xticks(x, [f"{d}\n{k}" for d, k in table.index], fontsize=8)
    ax.set_ylabel("seconds in steps")
    ax.legend()
    return ax
