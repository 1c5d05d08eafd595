"""Gantt-style plot of one simulated iteration's events (`simulator.training.training_timeline`).

One band per pipeline stage: the compute stream as a full-height bar, the p2p and DP
streams as thin bars beneath it.
"""

from __future__ import annotations

from simulator.engine.pipeline_api import TraceEvent

COLORS = {
    "F": "tab:blue",         # forward
    "B": "tab:orange",       # backward (including recomputation)
    "optimizer": "tab:gray",
    "p2p": "tab:green",      # activation / gradient between stages
    "dp": "tab:purple",      # gradient reduction, parameter all-gather
}
# Vertical layout of one stage's band (in units of one band): compute on top, thin streams below.
ROWS = {"compute": (0.35, 0.55), "p2p": (0.2, 0.1), "dp": (0.05, 0.1)}
LABEL_CHAR_WIDTH = 0.008  # fraction of the time axis one label character needs (fontsize 6)


def _color(event: TraceEvent) -> str:
    if event.stream != "compute":
        return COLORS[event.stream]
    return COLORS["optimizer" if event.name == "optimizer" else event.name[0]]


def plot_timeline(events: list[TraceEvent], ax=None, time_unit_s: float = 1e-3, labels: bool = True):
    """Gantt chart of `events`: stage 0 on top, time in units of `time_unit_s` (default ms).

    Forward boxes are blue, backward orange, the optimizer gray; p2p (green) and DP (purple)
    transfers are thin bars under each stage's compute stream. Compute boxes carry their
    micro-batch number (and chunk, for interleaved schedules) where they are wide enough.
    """
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    ax = ax or plt.subplots(figsize=(10, 3.5))[1]
    stages = sorted({e.stage for e in events})
    band = {s: len(stages) - 1 - i for i, s in enumerate(stages)}  # stage 0 on top
    groups: dict[tuple[int, str, str], list[tuple[float, float]]] = {}
    for e in events:
        span = (e.start_s / time_unit_s, (e.end_s - e.start_s) / time_unit_s)
        groups.setdefault((e.stage, e.stream, _color(e)), []).append(span)
    for (stage, stream, color), spans in groups.items():
        y0, height = ROWS[stream]
        ax.broken_barh(spans, (band[stage] + y0, height), facecolors=color,
                       edgecolor="white", linewidth=0.3)

    interleaved = any(e.args.get("chunk", 0) > 0 for e in events)
    span_s = max(e.end_s for e in events) - min(e.start_s for e in events)
    y_mid = ROWS["compute"][0] + ROWS["compute"][1] / 2
    for e in events:
        if not labels or e.stream != "compute" or e.name == "optimizer":
            continue
        text = f"{e.args['mb']}" + (f".{e.args['chunk']}" if interleaved else "")
        if e.end_s - e.start_s >= LABEL_CHAR_WIDTH * len(text) * span_s:
            ax.text((e.start_s + e.end_s) / 2 / time_unit_s, band[e.stage] + y_mid, text,
                    ha="center", va="center", fontsize=6, color="white")

    ax.set_yticks([band[s] + y_mid for s in stages])
    ax.set_yticklabels([f"stage {s}" for s in stages])
    ax.set_ylim(0, len(stages))
    unit = {1.0: "s", 1e-3: "ms", 1e-6: "us"}.get(time_unit_s, f"x {time_unit_s:g} s")
    ax.set_xlabel(f"time ({unit})")
    names = {"F": "forward", "B": "backward", "optimizer": "optimizer", "p2p": "p2p", "dp": "dp"}
    legend = [Patch(color=COLORS[k], label=label) for k, label in names.items()]
    ax.legend(handles=legend, fontsize=7, ncol=5, loc="upper center", bbox_to_anchor=(0.5, -0.22))
    return ax
