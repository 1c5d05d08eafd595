"""GNNReport: what one simulated epoch of distributed GNN training predicts, as data."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

BREAKDOWN_KEYS = ("sample", "fetch_local", "fetch_remote", "compute", "h2d_copy", "allreduce",
                  "sparse_update", "stall", "serve")
"""Named parts of the slowest trainer's iteration on its critical path; they sum to it.
`sample` and the fetches count only where they are not hidden behind other work; `stall` is
the trainer waiting for its sampler processes; `serve` the trainer waiting for the owners'
server processes (DistDGL's layout, `simulator.gnn.costs`) beyond all of that."""


@dataclass
class TrainerLoad:
    """One machine's trainers (they share the part, so they share these figures)."""

    part: int
    trainers: int
    train_nodes: float                 # training nodes the part owns
    seeds_per_epoch: float             # seeds each trainer processes (DGL's node_split, force_even)
    local_seed_fraction: float         # of those, owned by the part
    input_nodes: float                 # per mini-batch
    local_input_fraction: float
    cached_input_fraction: float
    remote_input_fraction: float
    remote_bytes_per_iteration: float  # per trainer: features (and sampled edges) over the network
    iteration_time_s: float
    stages_s: dict[str, float]         # un-overlapped duration of each stage


@dataclass
class GNNReport:
    graph: str
    model: str
    cluster: str
    machines: int
    trainers: int
    epoch_time_s: float
    iteration_time_s: float
    iterations_per_epoch: int
    breakdown: dict[str, float]
    remote_bytes_per_epoch: float      # every trainer's network reads: features, sampled edges, embeddings
    local_bytes_per_epoch: float       # feature rows copied out of local memory (owned and cached)
    allreduce_bytes_per_epoch: float   # gradient bytes each trainer all-reduces, summed over iterations
    sampled_nodes_per_layer: list[float]   # unique nodes per hop, seeds first (slowest trainer)
    sampled_edges_per_layer: list[float]
    candidate_edges_per_layer: list[float]   # edges of rows above the fan-out, which a shuffling sampler draws from
    trainer_loads: list[TrainerLoad]
    partition: dict[str, Any]
    path: str                          # "measured" (sampled on the graph) or "statistical"
    plan: dict[str, Any] = field(default_factory=dict)

    @property
    def seeds_per_s(self) -> float:
        return self.trainers * self.trainer_loads[0].seeds_per_epoch / self.epoch_time_s if self.epoch_time_s else 0.0

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["seeds_per_s"] = self.seeds_per_s
        out["per_trainer_load"] = out.pop("trainer_loads")
        return out
