"""Graph spec: the graph a GNN trains on, as files on disk or as a statistical description.

Two kinds share one spec, so every command takes either by catalog name or YAML path:

- **a real graph** (`files:` given): an edge list as CSV (two integer columns, `src,dst`), as
  NumPy `.npz` (arrays `src` and `dst`, or `edge_index` of shape (2, E)), or a node-property
  dataset in the OGB on-disk layout (Hu et al. 2020, arXiv 2005.00687); optional node features,
  labels and training mask in files beside it. The statistics below may then be left out (they
  are read from the files) or given as a check.
- **a statistical description** (no `files:`): nodes, edges, degree distribution, feature
  dimension, class count, split fractions and community structure. `simulator.gnn.graph.
  generate_graph` builds such a graph (a degree-corrected stochastic block model, reproducible
  from `seed`); the simulator can also predict from the statistics alone for graphs too large to
  build (`ogbn-papers100m`).

Where the labelled nodes sit matters to partitioning: `train_community_fraction` < 1 draws the
training (and validation and test) nodes from that fraction of the communities only, so they are
concentrated in part of the graph. ogbn-papers100M is such a graph: its labelled nodes are the
~1.5M arXiv papers among the 111M papers of the Microsoft Academic Graph (Hu et al. 2020, arXiv
2005.00687, section on ogbn-papers100M), and arXiv covers a few of MAG's fields of study, so a
min-cut partitioner that balances node counts only puts most of them on a few machines (DistDGL,
arXiv 2010.05337: plain METIS is slower than random there). The default, 1.0, keeps the old
behaviour: labelled nodes drawn uniformly at random.

Edges are counted as the message-passing graph stores them: directed, an undirected edge counts
twice (once as an in-edge of each end). The average in-degree is `num_edges / num_nodes`.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, model_validator

from simulator.specs.base import Spec


class GraphFiles(Spec):
    """Where a real graph's arrays are.

    `format`:
    - `csv`: `edges` is a text file of `src,dst` integer rows (a header line is skipped);
    - `npz`: `edges` is a NumPy archive with `src` and `dst`, or `edge_index` (2, E);
    - `ogb`: `edges` is a dataset directory of the OGB layout: `raw/edge.csv[.gz]` or
      `raw/data.npz` (`edge_index`, `node_feat`, `num_nodes_list`), `raw/node-feat.csv[.gz]`,
      `raw/node-label.csv[.gz]` or `raw/node-label.npz`, and `split/<name>/{train,valid,test}.csv[.gz]`
      (node ids, one per line); `features`, `labels`, `train_mask` then default to those files.

    `features`, `labels`: `.npy` (rows = nodes) or `.csv`; `train_mask`: `.npy` of booleans (one
    per node) or of node ids, or a text file of node ids. Relative paths are relative to the
    spec file's directory when loaded from one, else to the working directory.
    """

    kind: ClassVar[str] = "graph.files"
    format: Literal["csv", "npz", "ogb"]
    edges: str = Field(description="edge list file (csv, npz) or OGB dataset directory (ogb)")
    features: str | None = None
    labels: str | None = None
    train_mask: str | None = None
    undirected: bool = Field(default=True, description="add the reverse of every edge (as DGL/OGB loaders do)")


class GraphSpec(Spec):
    """A graph: files on disk, or the statistics a generator or the simulator works from."""

    kind: ClassVar[str] = "graph"
    name: str | None = None
    source: str | None = Field(default=None, description="where the figures come from")
    files: GraphFiles | None = Field(default=None, description="a real graph; absent: a statistical description")
    num_nodes: int | None = Field(default=None, ge=1)
    num_edges: int | None = Field(default=None, ge=0, description="directed (stored) edges; undirected count twice")
    degree_distribution: Literal["powerlaw", "poisson"] = "powerlaw"
    degree_exponent: float = Field(default=2.1, gt=1, description="powerlaw: P(degree = k) ~ k^-exponent")
    feature_dim: int = Field(default=0, ge=0, description="input features per node; 0: none")
    num_classes: int = Field(default=2, ge=1)
    train_fraction: float = Field(default=0.1, gt=0, le=1, description="fraction of nodes in the training set")
    val_fraction: float = Field(default=0.05, ge=0, lt=1)
    test_fraction: float = Field(default=0.05, ge=0, lt=1)
    num_communities: int = Field(default=1, ge=1, description="generator: blocks of the stochastic block model")
    intra_community_fraction: float = Field(
        default=0.8, ge=0, le=1, description="generator: fraction of each node's edges inside its community")
    train_community_fraction: float = Field(
        default=1.0, gt=0, le=1, description="generator: the labelled (train/val/test) nodes are drawn from this "
        "fraction of the communities; 1: spread over the whole graph")
    feature_noise: float = Field(
        default=1.0, ge=0, description="generator: std of the noise around each class's feature mean (mean norm 1)")
    seed: int = Field(default=0, ge=0, description="of numpy's generator, which takes no negatives")

    @model_validator(mode="after")
    def _kind_of_graph(self):
        if self.files is None:
            for name in ("num_nodes", "num_edges"):
                if getattr(self, name) is None:
                    raise ValueError(f"{name}: required by a statistical graph (one without files)")
        if self.train_fraction + self.val_fraction + self.test_fraction > 1 + 1e-9:
            raise ValueError(
                f"train_fraction: train + val + test fractions must be <= 1, got "
                f"{self.train_fraction} + {self.val_fraction} + {self.test_fraction}")
        if self.files is None and self.num_nodes is not None and self.num_edges is not None \
                and self.num_edges > self.num_nodes * (self.num_nodes - 1):
            raise ValueError(f"num_edges: a graph of {self.num_nodes:,} nodes without self loops or repeated "
                             f"edges stores at most num_nodes x (num_nodes - 1) = "
                             f"{self.num_nodes * (self.num_nodes - 1):,}")
        if self.num_nodes is not None and self.num_communities > self.num_nodes:
            raise ValueError(f"num_communities: must be <= num_nodes = {self.num_nodes}")
        return self

    @property
    def generated(self) -> bool:
        """True for a statistical description (built by the generator), False for files."""
        return self.files is None

    @property
    def average_degree(self) -> float:
        """Stored (in-)edges per node; needs the statistics."""
        return (self.num_edges or 0) / (self.num_nodes or 1)

    @property
    def num_train_nodes(self) -> int:
        """Training nodes the statistics imply (the generator draws exactly this many)."""
        return max(1, round(self.train_fraction * (self.num_nodes or 0)))
