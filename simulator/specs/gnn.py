"""GNN specs: the model (GraphSAGE, GCN, GAT with sampled fan-outs) and the training plan.

The plan's fields are DistDGL's knobs (Zheng et al., "DistDGL: Distributed Graph Neural Network
Training for Billion-Scale Graphs", arXiv 2010.05337): how the graph is partitioned across
machines, how many trainer and sampler processes each machine runs, the mini-batch per trainer,
and how node features are placed, cached and fetched. Input width and class count come from
the graph spec, not the model.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, model_validator

from simulator.specs.base import Spec

FEATURE_DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


class GNNModelSpec(Spec):
    """A node-classification GNN trained on sampled neighborhoods.

    `fanouts[h]` is the number of neighbors sampled per node at hop h counted from the seed
    (output) nodes: `[15, 10, 5]` samples 15 neighbors of each seed, 10 of each of those, 5 of
    each of those, as the sampler of DistDGL's GraphSAGE example (DGL 0.5 `train_dist.py`)
    applies its `--fan_out` list. (DGL's later `NeighborSampler` takes the reverse order: its
    first entry belongs to the input-side layer.)

    `num_heads` is GAT's attention heads (each of width hidden_size / num_heads); `embedding_dim` adds a learnable embedding per node (a sparse parameter updated only on the
    rows a batch touches), concatenated to the input features.
    """

    kind: ClassVar[str] = "gnn_model"
    name: str | None = None
    source: str | None = None
    architecture: Literal["graphsage", "gcn", "gat"]
    num_layers: int = Field(ge=1)
    hidden_size: int = Field(ge=1)
    fanouts: list[int] = Field(min_length=1, description="neighbors sampled per node per hop, seed side first")
    num_heads: int = Field(default=1, ge=1, description="gat: attention heads")
    aggregator: Literal["mean", "gcn", "pool"] = Field(default="mean", description="graphsage: neighbor aggregator")
    embedding_dim: int | None = Field(default=None, ge=1, description="learnable node embedding width; None: none")
    dropout: float = Field(default=0.5, ge=0, lt=1)

    @model_validator(mode="after")
    def _shape(self):
        if len(self.fanouts) != self.num_layers:
            raise ValueError(f"fanouts: needs one entry per layer (num_layers = {self.num_layers}), "
                             f"got {len(self.fanouts)}")
        if any(f < 1 for f in self.fanouts):
            raise ValueError(f"fanouts: every entry must be >= 1, got {self.fanouts}")
        if self.architecture != "gat" and self.num_heads != 1:
            raise ValueError(f"num_heads: only gat has attention heads, {self.architecture} needs 1")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size: must be divisible by num_heads = {self.num_heads}")
        return self


class GNNPlan(Spec):
    """How one GNN training job runs on a cluster of machines (DistDGL's design).

    - `partition`: `metis` (min edge cut), `random`, or `metis-balanced` (edge cut with
      training nodes, edges and nodes balanced across parts, DistDGL's multi-constraint METIS);
      one part per machine.
    - `trainers_per_machine`: trainer processes (data parallel, one gradient all-reduce group);
      `samplers_per_trainer`: sampler processes feeding each trainer (0: the trainer samples).
    - `batch_size_per_trainer`: seed (output) nodes per mini-batch per trainer.
    - `feature_placement`: `partitioned` (each machine holds its own nodes' features and fetches
      the rest over the network) or `replicated` (every machine holds all features).
    - `feature_cache_fraction`: with partitioned features, the fraction of each machine's halo
      (remote neighbor) nodes, most-accessed first, whose features are replicated locally.
    - `pipeline_fetch`: fetch the next batch's features while this batch computes.
    - `feature_dtype`: how features are stored and sent.
    """

    kind: ClassVar[str] = "gnn_plan"
    name: str | None = None
    source: str | None = None
    partition: Literal["metis", "random", "metis-balanced"] = "metis-balanced"
    trainers_per_machine: int = Field(default=1, ge=1)
    samplers_per_trainer: int = Field(default=0, ge=0)
    batch_size_per_trainer: int = Field(default=1000, ge=1)
    feature_placement: Literal["partitioned", "replicated"] = "partitioned"
    feature_cache_fraction: float = Field(default=0.0, ge=0, le=1)
    pipeline_fetch: bool = False
    feature_dtype: Literal["fp32", "bf16", "fp16"] = "fp32"

    @model_validator(mode="after")
    def _cache(self):
        if self.feature_placement == "replicated" and self.feature_cache_fraction > 0:
            raise ValueError("feature_cache_fraction: replicated features have nothing remote to cache; "
                             "must be 0 with feature_placement 'replicated'")
        return self

    @property
    def feature_bytes(self) -> int:
        """Bytes of one feature value in `feature_dtype`."""
        return FEATURE_DTYPE_BYTES[self.feature_dtype]
