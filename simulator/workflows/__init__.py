"""LLM-call workflows: predict how much running a prompt program's independent calls at once
speeds it up, from its call DAG (a trace of `executor.prompts`, or one built by hand).

- `dag`: the DAG of calls (tokens in and out, dependencies, the program's own time between
  a call's inputs being ready and its issue) from a trace.
- `predict`: (a) Amdahl's estimate over stages, as APPL (Dong et al. 2024, arXiv
  2406.13161) computes it: calls grouped by dependency depth, each stage as long as its
  slowest call; (b) the discrete-event replay of the DAG against the serving model
  (continuous batching with `max_num_seqs`, step times from `simulator.serving.iteration`),
  which sees what Amdahl cannot: a server that batches only so many calls, and decode steps
  that slow down as the batch grows.
- `latency`: the latency of one call at a given batch size, for the simulated backend.
"""

from simulator.workflows.dag import CallNode, WorkflowDAG, dag_from_trace
from simulator.workflows.latency import CallLatency
from simulator.workflows.predict import WorkflowPrediction, amdahl, predict_workflow, replay

__all__ = ["CallLatency", "CallNode", "WorkflowDAG", "WorkflowPrediction", "amdahl", "dag_from_trace",
           "predict_workflow", "replay"]
