"""Sequential vs parallel makespan of a call DAG: Amdahl's estimate and a serving replay.

(a) **Amdahl over stages** (APPL, Dong et al. 2024, Sec. 5): a call's stage is one more than
its deepest dependency's; run one call at a time the program takes the sum of its calls'
durations, run in parallel the sum over stages of each stage's longest call; the estimate is
their ratio. Durations are the traced ones (or, for a hand-written DAG, each call alone on
the deployment). It assumes the server runs any number of calls as fast as one.

(b) **Replay on the serving model**: the calls go to one replica of the deployment as they
become ready (their inputs done, plus the program's own gap before issuing them). The replica
batches up to `max_num_seqs` calls; a step either prefills newly admitted prompts (prefill
priority, up to `max_batched_tokens`) or decodes one token of every running call, and lasts
what `simulator.serving.iteration` says for that batch. The same replay with one call at a
time, in issue order, gives the sequential makespan.
"""

from __future__ import annotations

import heapq
from dataclasses import asdict, dataclass, field
from typing import Any

from simulator.serving.iteration import IterationModel, Work
from simulator.workflows.dag import CallNode, WorkflowDAG
from simulator.workflows.latency import serving_models


def stages(dag: WorkflowDAG) -> dict[str, int]:
    level: dict[str, int] = {}
    for i in dag.order():
        level[i] = 1 + max((level[d] for d in dag.calls[i].deps), default=-1)
    return level


def amdahl(dag: WorkflowDAG, durations: dict[str, float]) -> tuple[float, float, int]:
    """(sequential, parallel, number of stages) over the given call durations."""
    level = stages(dag)
    longest: dict[int, float] = {}
    for i, s in level.items():
        longest[s] = max(longest.get(s, 0.0), durations[i])
    return sum(durations.values()), sum(longest.values()), len(longest)


@dataclass
class Replay:
    makespan_s: float
    start_s: dict[str, float]
    end_s: dict[str, float]
    peak_batch: int
    steps: int


def replay(dag: WorkflowDAG, prefill: IterationModel, decode: IterationModel, max_num_seqs: int = 256,
           max_batched_tokens: int = 8192, sequential: bool = False) -> Replay:
    """Discrete-event replay of the DAG on one replica (see the module docstring)."""
    order = dag.order()
    calls = dag.calls
    users: dict[str, list[str]] = {i: [] for i in calls}
    for i in order:
        for d in calls[i].deps:
            users[d].append(i)
    waiting = {i: len(calls[i].deps) for i in calls}
    ready: list[tuple[float, int, str]] = []  # (ready time, issue rank, id)
    rank = {i: n for n, i in enumerate(order)}
    end: dict[str, float] = {}
    start: dict[str, float] = {}
    seq_next = 0  # sequential: the next call in issue order

    def release(i: str, at: float) -> None:
        heapq.heappush(ready, (at + calls[i].gap_s, rank[i], i))

    if sequential:
        release(order[0], 0.0)
    else:
        for i in order:
            if waiting[i] == 0:
                release(i, 0.0)
    running: dict[str, list[int]] = {}  # id -> [generated, context]
    t, peak, steps = 0.0, 0, 0
    while ready or running:
        if not running and ready and ready[0][0] > t:
            t = ready[0][0]
        admitted: list[str] = []
        budget = max_batched_tokens
        while ready and ready[0][0] <= t and len(running) + len(admitted) < max_num_seqs:
            p = calls[ready[0][2]].prompt_tokens
            if admitted and p > budget:
                break
            admitted.append(heapq.heappop(ready)[2])
            budget -= p
        if admitted:
            works = [Work(calls[i].prompt_tokens, 0, 1) for i in admitted]
            t += prefill.step_s(works)
            for i in admitted:
                start[i] = t
                running[i] = [1, calls[i].prompt_tokens + 1]
        else:
            works = [Work(1, ctx, 1) for _, ctx in running.values()]
            t += decode.step_s(works)
            for state in running.values():
                state[0] += 1
                state[1] += 1
        steps += 1
        peak = max(peak, len(running))
        for i in [i for i, (gen, _) in running.items() if gen >= calls[i].output_tokens]:
            del running[i]
            end[i] = t
            if sequential:
                seq_next += 1
                if seq_next < len(order):
                    release(order[seq_next], t)
            else:
                for u in users[i]:
                    waiting[u] -= 1
                    if waiting[u] == 0:
                        release(u, max(end[d] for d in calls[u].deps))
    return Replay(max(end.values(), default=0.0), start, end, peak, steps)


@dataclass
class WorkflowPrediction:
    calls: int
    stages: int
    measured_s: float | None
    amdahl_sequential_s: float
    amdahl_parallel_s: float
    amdahl_speedup: float
    simulated_sequential_s: float | None = None
    simulated_parallel_s: float | None = None
    simulated_speedup: float | None = None
    simulated_peak_batch: int | None = None
    serving: dict[str, Any] = field(default_factory=dict)  # model, cluster, deployment
    durations: str = "measured"  # where Amdahl's call durations come from

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def predict_workflow(dag: WorkflowDAG, model: str | None = None, cluster: str | None = None,
                     deployment: str | None = None) -> WorkflowPrediction:
    """Amdahl's estimate from the traced durations, and with a model, cluster and deployment,
    the serving replay (both makespans)."""
    serving = None
    if model or cluster or deployment:
        if not (model and cluster and deployment):
            raise ValueError(f"model={model!r}, cluster={cluster!r}, deployment={deployment!r}: "
                             "the serving replay needs all three")
        serving = serving_models(model, cluster, deployment)
    measured = {i: n.measured_s for i, n in dag.calls.items() if n.measured_s is not None}
    if len(measured) == len(dag.calls):
        durations, source = measured, "measured"
    elif serving is not None:
        pre, dec, _ = serving
        durations = {i: replay(WorkflowDAG({i: CallNode(i, n.prompt_tokens, n.output_tokens)}), pre, dec).makespan_s
                     for i, n in dag.calls.items()}
        source = "simulated, each call alone"
    else:
        raise ValueError("the workflow has calls without measured durations: give model, cluster and "
                         "deployment to simulate them")
    # the program's own time before a call counts with the call, in its stage
    seq, par, n_stages = amdahl(dag, {i: d + dag.calls[i].gap_s for i, d in durations.items()})
    out = WorkflowPrediction(len(dag.calls), n_stages, dag.measured_s, seq, par,
                             seq / par if par > 0 else 1.0, durations=source)
    if serving is not None:
        pre, dec, dep = serving
        s = replay(dag, pre, dec, dep.max_num_seqs, dep.max_batched_tokens, sequential=True)
        p = replay(dag, pre, dec, dep.max_num_seqs, dep.max_batched_tokens)
        out.simulated_sequential_s, out.simulated_parallel_s = s.makespan_s, p.makespan_s
        out.simulated_speedup = s.makespan_s / p.makespan_s if p.makespan_s > 0 else 1.0
        out.simulated_peak_batch = p.peak_batch
        out.serving = {"model": model, "cluster": cluster, "deployment": deployment}
    return out
