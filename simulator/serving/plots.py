"""Plots and small studies of serving runs, for notebooks/serving.ipynb.

- `throughput_vs_ratio`: output tokens/s of several deployments as the prefill/decode
  balance of the workload moves (fixed-length requests, total length held constant), the
  figure that shows when re-sharding pays (Seesaw, Su et al., MLSys'25, Fig. 2);
- `transition_timeline`: replica 0's engine steps, re-sharding transitions and KV copies
  over time, read from a Chrome trace or from the recorder's events;
- `latency_cdfs`: TTFT and TPOT distributions of several runs on shared axes;
- `roofline_decode_step_s` / `decode_step_check`: an independent estimate of a decode step
  from the roofline of FORMULAS.md (Seesaw App. A), written from the model's shapes and the
  datasheet alone (no shared cost code), against the simulator's step time.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from simulator.engine.pipeline_api import TraceEvent
from simulator.errors import InfeasiblePlan, SpecError
from simulator.serving.iteration import IterationModel, Work
from simulator.serving.report import ServingReport
from simulator.serving.simulate import simulate_serving
from simulator.specs.catalog import load_cluster, load_model
from simulator.specs.serving import Parallel

STEP_COLORS = {"prefill": "tab:blue", "decode": "tab:orange", "mixed": "tab:green"}
TRANSITION_COLOR = "tab:red"
COPY_COLORS = {"kv to cpu": "tab:purple", "kv to gpu": "tab:olive", "swap": "tab:brown"}


# --- throughput vs prefill/decode ratio --------------------------------------------------------

def ratio_workload(ratio: float, num_requests: int, total_tokens: int) -> dict[str, Any]:
    """Offline fixed-length requests with input / output = `ratio` and input + output = total."""
    inp = min(max(1, round(total_tokens * ratio / (1 + ratio))), total_tokens - 1)
    return {"num_requests": num_requests, "arrival": {"kind": "offline"},
            "input_tokens": {"distribution": "fixed", "value": inp},
            "output_tokens": {"distribution": "fixed", "value": total_tokens - inp}}


def throughput_vs_ratio(model: Any, cluster: Any, deployments: Mapping[str, Any], ratios: Sequence[float],
                        num_requests: int, ax=None, total_tokens: int = 1024):
    """Simulate every deployment at every input/output length ratio; plot output tokens/s.

    The x axis is the prefill/decode ratio (prompt tokens per generated token); a deployment
    that does not fit is left out at that ratio (NaN). Returns a DataFrame (ratio x deployment).
    """
    import matplotlib.pyplot as plt
    import pandas as pd

    model, cluster = load_model(model), load_cluster(cluster)
    table = {}
    for name, dep in deployments.items():
        col = []
        for r in ratios:
            try:
                col.append(simulate_serving(model, cluster, dep, ratio_workload(r, num_requests, total_tokens))
                           .output_tokens_per_s)
            except (SpecError, InfeasiblePlan):
                col.append(math.nan)
        table[name] = col
    df = pd.DataFrame(table, index=pd.Index(list(ratios), name="input / output tokens"))
    ax = ax or plt.subplots(figsize=(7, 3.5))[1]
    for name in df.columns:
        ax.plot(df.index, df[name], marker="o", label=name, ls="--" if "->" in name else "-")
    ax.set_xscale("log", base=2)
    ax.set_xlabel(f"prefill/decode ratio (input / output tokens; input + output = {total_tokens})")
    ax.set_ylabel("output tokens/s")
    ax.set_title(f"{model.name} on {cluster.name}, {num_requests} offline requests")
    ax.legend(fontsize=8)
    return df


def prefix_caching_sweep(model: Any, cluster: Any, deployment: Mapping[str, Any], workload: Mapping[str, Any],
                         prefix_tokens: Sequence[int], axes=None):
    """TTFT p50 and output tokens/s as the prompts' shared prefix grows (`shared_prefix.tokens`;
    the workload's own `input_tokens` follow it), with prefix caching off and on; plotted on two
    axes. Returns a DataFrame (prefix tokens x metric and caching)."""
    import matplotlib.pyplot as plt
    import pandas as pd

    model, cluster = load_model(model), load_cluster(cluster)
    groups = workload.get("shared_prefix", {}).get("groups", 1)
    rows = []
    for tokens in prefix_tokens:
        wl = {**workload, "shared_prefix": {"tokens": tokens, "groups": groups}}
        for caching in (False, True):
            rep = simulate_serving(model, cluster, {**deployment, "prefix_caching": caching}, wl)
            rows.append({"prefix tokens": tokens, "prefix caching": "on" if caching else "off",
                         "TTFT p50 (s)": rep.ttft_s["p50"], "output tokens/s": rep.output_tokens_per_s})
    df = pd.DataFrame(rows).pivot(index="prefix tokens", columns="prefix caching")
    axes = axes if axes is not None else plt.subplots(1, 2, figsize=(9, 3.2))[1]
    for ax, metric in zip(axes, ("TTFT p50 (s)", "output tokens/s")):
        for caching in ("off", "on"):
            ax.plot(df.index, df[(metric, caching)], marker="o", label=f"prefix caching {caching}")
        ax.set_xlabel(f"shared prefix (tokens, {groups} groups)")
        ax.set_ylabel(metric)
    axes[0].legend(fontsize=8)
    axes[0].set_title(f"{model.name} on {cluster.name}", fontsize=9)
    return df


# --- transition timeline -----------------------------------------------------------------------

def _boxes(events: Any, replica: int) -> list[tuple[str, str, float, float]]:
    """(stream, name, start_s, end_s) of one replica, from a trace path, a trace dict or TraceEvents."""
    if isinstance(events, (str, Path)):
        events = json.loads(Path(events).read_text())
    if isinstance(events, Mapping):
        return [(e["cat"], e["name"], e["ts"] * 1e-6, (e["ts"] + e["dur"]) * 1e-6)
                for e in events["traceEvents"] if e.get("ph") == "X" and e["pid"] == replica]
    return [(e.stream, e.name, e.start_s, e.end_s) for e in events
            if isinstance(e, TraceEvent) and e.stage == replica]


def transition_timeline(events: Any, ax=None, replica: int = 0, window: tuple[float, float] | None = None):
    """Draw one replica's prefill/decode steps, transitions and KV copies over time.

    `events`: a Chrome trace written by `simulate_serving(..., trace_path=...)` (path or
    loaded dict) or a list of `TraceEvent`s. Three rows: engine steps coloured by kind,
    re-sharding transitions, KV copies on the copy stream. `window` limits the time axis (s).
    """
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    boxes = _boxes(events, replica)
    if window:
        boxes = [b for b in boxes if b[3] >= window[0] and b[2] <= window[1]]
    rows = {"engine steps": 2, "transitions": 1, "KV copies": 0}
    ax = ax or plt.subplots(figsize=(10, 2.6))[1]
    groups: dict[tuple[int, str], list[tuple[float, float]]] = {}
    for stream, name, start, end in boxes:
        if name in STEP_COLORS:
            key = (rows["engine steps"], STEP_COLORS[name])
        elif name.startswith("to "):
            key = (rows["transitions"], TRANSITION_COLOR)
        elif stream == "kv":
            key = (rows["KV copies"], COPY_COLORS.get(name, "tab:gray"))
        else:
            continue
        groups.setdefault(key, []).append((start, end - start))
    for (row, color), spans in groups.items():
        ax.broken_barh(spans, (row - 0.4, 0.8), facecolors=color, linewidth=0)
    ax.set_yticks(list(rows.values()), list(rows))
    ax.set_xlabel("time (s)")
    if window:
        ax.set_xlim(*window)
    used = {c for _, c in groups}
    legend = {**{k: v for k, v in STEP_COLORS.items()}, "transition": TRANSITION_COLOR, **COPY_COLORS}
    ax.legend(handles=[Patch(color=c, label=k) for k, c in legend.items() if c in used],
              loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    ax.set_title(f"replica {replica}")
    return ax


def phase_summary(events: Any, replica: int = 0) -> dict[str, float]:
    """Seconds replica `replica` spent in each kind of box (steps by kind, transitions, copies)."""
    out: dict[str, float] = {}
    for _, name, start, end in _boxes(events, replica):
        out[name] = out.get(name, 0.0) + end - start
    return out


# --- latency CDFs ------------------------------------------------------------------------------

def _minor_log_label(x: float, _pos) -> str:
    """Label the 2s and 5s between decades of a log axis, leave the other minor ticks bare."""
    mantissa = x / 10 ** math.floor(math.log10(x)) if x > 0 else 0
    return f"{x:g}" if min(abs(mantissa - 2), abs(mantissa - 5)) < 1e-6 else ""


def latency_cdfs(reports: Mapping[str, ServingReport], axes=None):
    """TTFT and TPOT CDFs of several runs, one line per run (TTFT on a logarithmic axis: its
    tail under load spans orders of magnitude)."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    axes = axes if axes is not None else plt.subplots(1, 2, figsize=(10, 3.2))[1]
    for name, report in reports.items():
        report.plot_latency_cdf(axes, label=name)
    axes[0].set_xscale("log")
    axes[0].xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:g}"))
    axes[0].xaxis.set_minor_formatter(FuncFormatter(_minor_log_label))
    for a in axes:
        a.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    return axes


def latency_table(reports: Mapping[str, ServingReport]):
    """p50 / p90 / p99 of TTFT and TPOT (ms) and throughput, one row per run."""
    import pandas as pd

    rows = {}
    for name, r in reports.items():
        rows[name] = {**{f"TTFT {k} (ms)": r.ttft_s[k] * 1e3 for k in ("p50", "p90", "p99")},
                      **{f"TPOT {k} (ms)": r.tpot_s[k] * 1e3 for k in ("p50", "p90", "p99")},
                      "output tok/s": r.output_tokens_per_s, "preemptions": r.preemptions}
    return pd.DataFrame(rows).T


# --- independent estimate: roofline decode step ------------------------------------------------

def layer_params(model) -> float:
    """Weights of one layer (parameters): QKV with GQA, output projection, MLP (FORMULAS.md)."""
    h, a, g, f = model.hidden_size, model.num_attention_heads, model.num_kv_heads, model.ffn_hidden_size
    qkv = h * (h + 2 * h * g / a)
    mlp = (3 if model.activation == "swiglu" else 2) * h * f
    return qkv + h * h + mlp


def roofline_decode_step_s(model: Any, cluster: Any, tp: int, batch: int, context: int,
                           achievable: bool = False) -> dict[str, float]:
    """One decode step of `batch` sequences with `context` cached tokens on one TP group.

    Per layer (Seesaw App. A): linear layers max(2W/B_hbm, 2bW/FLOPS) over the TP shard, the
    KV read 4 b s h_kv d bytes, the TP all-reduces 4 b h_q d bytes as a ring over the intra-node
    link; plus the LM head's weights once. Datasheet peaks; with `achievable`, HBM at the
    device's memory-bound efficiency and the per-step overhead added (FORMULAS.md: the pure
    roofline is far too optimistic for small batches).
    """
    m, c = load_model(model), load_cluster(cluster)
    dev = c.device
    hbm = dev.hbm_bandwidth_bytes_per_s * (dev.efficiency.memory_bound if achievable else 1.0)
    w = layer_params(m) / tp
    linear = max(2 * w / hbm, 2 * batch * w / dev.peak_flops)
    kv_heads = max(m.num_kv_heads / tp, 1)  # replicated when tp > KV heads
    kv_read = 4 * batch * context * kv_heads * m.head_dim / hbm
    link = c.bandwidth_bytes_per_s("intra_node")
    allreduce = 0.0 if tp == 1 else 2 * (tp - 1) / tp * 4 * batch * m.hidden_size / link
    lm_head = 2 * m.hidden_size * m.vocab_size / tp / hbm
    out = {"linear": m.num_layers * linear, "kv_read": m.num_layers * kv_read,
           "tp_allreduce": m.num_layers * allreduce, "lm_head": lm_head,
           "overhead": dev.efficiency.step_overhead_us * 1e-6 if achievable else 0.0}
    out["total"] = sum(out.values())
    return out


def decode_step_check(model: Any, cluster: Any, tp: int, batches: Iterable[int], context: int):
    """Roofline (datasheet), roofline (achievable + step overhead) and the simulator's decode
    step for each batch size, in ms, with the simulator's ratio to each."""
    import pandas as pd

    m, c = load_model(model), load_cluster(cluster)
    it = IterationModel(m, c, Parallel(tp=tp, pp=1))
    rows = []
    for b in batches:
        pure = roofline_decode_step_s(m, c, tp, b, context)
        real = roofline_decode_step_s(m, c, tp, b, context, achievable=True)
        sim = it.step_s([Work(1, context, True)] * b)
        rows.append({"batch": b, "roofline, datasheet (ms)": pure["total"] * 1e3,
                     "roofline, achievable + overhead (ms)": real["total"] * 1e3,
                     "simulator (ms)": sim * 1e3, "simulator / datasheet roofline": sim / pure["total"],
                     "simulator / achievable roofline": sim / real["total"]})
    return pd.DataFrame(rows).set_index("batch")
