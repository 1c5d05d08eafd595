"""Generate notebooks/workflows.ipynb from the cell sources below (no outputs).

The notebook runs a prompt program itself on the simulated backend (fast and deterministic),
draws its trace as a timeline, predicts its speedup, and reads the committed benchmark
(`benchmarks/results/prompts.json`) for the speedups measured on the local engine and through
`simtune serve`.

Usage: python notebooks/build_workflows_notebook.py
"""

from __future__ import annotations

from pathlib import Path

from nbbuild import write

OUT = Path(__file__).with_name("workflows.ipynb")

CELLS: list[tuple[str, str]] = [
    ("md", """\
# Prompt programs: parallel LLM calls, traced, predicted and measured

`executor.prompts` runs LLM calls written in Python (`@ppl` functions, `gen()` futures) as soon as
their inputs are ready, many at once, and writes a JSONL trace. `simulator.workflows` predicts
the speedup of running them in parallel from that trace: Amdahl's estimate over stages (APPL,
Dong et al. 2024) and a replay of the call DAG on the serving model, which also sees how many
calls a server batches and how a bigger batch slows each decode step.

1. **A program**: self-consistency with 8 branches and a final vote, on the simulated backend.
2. **Its trace** as a timeline.
3. **Predicted speedup** from the trace.
4. **Measured vs predicted** on this machine (the committed benchmark)."""),
    ("code", """\
import json
import tempfile
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd

from executor.prompts import NumberedList, Runtime, SimulatedBackend, gen, ppl, read_trace
from simulator.workflows import dag_from_trace, predict_workflow

ROOT = Path.cwd().parent if Path.cwd().name == "notebooks" else Path.cwd()
TMP = Path(tempfile.mkdtemp())"""),
    ("md", "## 1. A program"),
    ("code", """\
@ppl
def branch(question: str, seed: int):
    \"\"\"Think step by step, then end with 'Answer: <number>'.\"\"\"
    f"Question: {question}"
    return gen(max_tokens=64, temperature=0.7, seed=seed)


@ppl
def vote(question: str, n: int = 8):
    answers = [branch(question, s) for s in range(n)]   # eight calls at once
    "Which answer is most common?"
    NumberedList(answers)                               # waits for all eight
    return gen(max_tokens=16)


# latencies of llama-3-8b on one A100, from the serving model; time runs 20x faster here
backend = SimulatedBackend("llama-3-8b", "1xa100-80gb", "vllm-tp1", time_scale=0.05)
with Runtime(backend, trace=str(TMP / "vote.jsonl")):
    print(vote("What is 24 + 18 - 29?"))"""),
    ("md", "## 2. Its trace"),
    ("code", """\
trace = read_trace(TMP / "vote.jsonl")
calls = sorted(trace.calls.values(), key=lambda c: c.submitted)
fig, ax = plt.subplots(figsize=(8, 3))
for row, c in enumerate(calls):
    ax.barh(row, c.started - c.submitted, left=c.submitted, color="lightgray")   # waiting for inputs
    ax.barh(row, c.ended - c.started, left=c.started, color="tab:blue")          # at the backend
ax.set_yticks(range(len(calls)), [c.path.split("/", 1)[1] for c in calls], fontsize=7)
ax.invert_yaxis()
ax.set_xlabel("seconds since the run started (gray: waiting for inputs)")
ax.set_title("calls of vote(): eight branches, then the vote")
fig.tight_layout()"""),
    ("md", "## 3. Predicted speedup"),
    ("code", """\
p = predict_workflow(dag_from_trace(TMP / "vote.jsonl"), "llama-3-8b", "1xa100-80gb", "vllm-tp1")
pd.Series({"calls": p.calls, "stages": p.stages, "Amdahl speedup": round(p.amdahl_speedup, 2),
           "replay speedup": round(p.simulated_speedup, 2), "replay peak batch": p.simulated_peak_batch})"""),
    ("md", """\
Amdahl's estimate takes the traced durations, which the simulated backend already stretched
for the batch it saw; the replay recomputes every call on the serving model, one at a time for
the sequential makespan and batched as they become ready for the parallel one."""),
    ("md", "## 4. Measured vs predicted on this machine"),
    ("code", """\
bench_path = ROOT / "benchmarks/results/prompts.json"
bench = json.loads(bench_path.read_text()) if bench_path.exists() else {}
rows = [{"backend": kind, "workflow": name, **{k: w[k] for k in ("calls", "measured_speedup", "amdahl_speedup",
                                                                  "simulated_speedup", "appl_measured_speedup")}}
        for kind, table in bench.get("workflows", {}).items() for name, w in table.items()]
measured = pd.DataFrame(rows)
measured if rows else "benchmarks/results/prompts.json has no workflow rows yet: run benchmarks/bench_prompts.py\""""),
    ("code", """\
if rows:
    ax = measured.set_index(["backend", "workflow"])[["measured_speedup", "amdahl_speedup", "simulated_speedup"]] \\
        .plot.bar(figsize=(9, 3.5), rot=20)
    ax.set_ylabel("speedup of parallel over sequential")
    ax.set_title("measured vs Amdahl vs the serving replay (SmolLM2-135M on this CPU)")
    ax.figure.tight_layout()"""),
    ("md", """\
Where the server's batch is the limit (a CPU serving SmolLM2 decodes a batch of ten much
slower than one request), the measured speedup falls short of Amdahl's estimate; the replay
prices that. APPL's published speedups (last column of the table) come from other models and
hardware and are for reference only."""),
]


if __name__ == "__main__":
    write(CELLS, OUT)
