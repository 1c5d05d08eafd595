"""Graphs a GNN trains on: the CSR container, the seeded generator, and the file loaders.

`Graph` holds in-edges in CSR form: the sources of the edges into node v are
`indices[indptr[v]:indptr[v + 1]]`, which are the neighbors a sampler draws for v. An undirected
graph stores every edge both ways, so its CSR is symmetric (`Graph.symmetric`).

The generator (`generate_graph`) is a degree-corrected stochastic block model (Karrer & Newman,
Phys. Rev. E 83, 2011) drawn the Chung-Lu way (Chung & Lu, PNAS 2002), all in numpy: every node
gets a community and a power-law weight; an intra-community edge picks its first end in
proportion to weight and its second, in proportion to weight, among the first end's community;
an inter-community edge picks both ends in proportion to weight over all nodes. Expected degrees
then follow the weights (a power law with the spec's exponent) and a fraction
`intra_community_fraction` of the edges stays inside communities. Labels are communities (modulo
the class count) and features are drawn around a per-class mean, so a GNN that averages
neighbors (mostly of the same community) learns labels that features alone predict worse.
10M stored edges take a few seconds on one core.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from simulator.errors import SpecError
from simulator.specs.graph import GraphSpec


@dataclass(frozen=True, eq=False)
class Graph:
    """A node-classification graph: CSR of in-edges, optional features, labels and split masks."""

    name: str
    num_nodes: int
    indptr: np.ndarray
    indices: np.ndarray
    features: np.ndarray | None = None
    labels: np.ndarray | None = None
    train_mask: np.ndarray | None = None
    val_mask: np.ndarray | None = None
    test_mask: np.ndarray | None = None
    communities: np.ndarray | None = None
    symmetric: bool = False  # every edge is stored both ways, no self loops

    @property
    def num_edges(self) -> int:
        return int(self.indices.size)

    @property
    def feature_dim(self) -> int:
        return 0 if self.features is None else int(self.features.shape[1])

    @property
    def num_classes(self) -> int:
        return 0 if self.labels is None else int(self.labels.max()) + 1

    @property
    def in_degrees(self) -> np.ndarray:
        return np.diff(self.indptr)

    @property
    def train_nodes(self) -> np.ndarray:
        """Global ids of the training nodes (all nodes when there is no mask)."""
        if self.train_mask is None:
            return np.arange(self.num_nodes, dtype=np.int64)
        return np.flatnonzero(self.train_mask)

    def destinations(self) -> np.ndarray:
        """The destination node of every stored edge, aligned with `indices`."""
        return np.repeat(np.arange(self.num_nodes, dtype=self.indices.dtype), self.in_degrees)

    @classmethod
    def from_edges(cls, src: Any, dst: Any, num_nodes: int | None = None, *, undirected: bool = False,
                   features: np.ndarray | None = None, labels: np.ndarray | None = None,
                   train_mask: np.ndarray | None = None, val_mask: np.ndarray | None = None,
                   test_mask: np.ndarray | None = None, name: str = "graph") -> Graph:
        """Build the CSR from an edge list `src[i] -> dst[i]`, checking every input.

        `undirected`: store each edge both ways, without duplicates or self loops.
        """
        src, dst = np.asarray(src), np.asarray(dst)
        if src.shape != dst.shape or src.ndim != 1:
            raise SpecError("graph.edges", f"src {src.shape}, dst {dst.shape}",
                            "must be two 1-D arrays of equal length")
        for what, arr in (("src", src), ("dst", dst)):
            if arr.size and not np.issubdtype(arr.dtype, np.integer):
                raise SpecError(f"graph.edges.{what}", str(arr.dtype), "node ids must be integers")
        if num_nodes is None:
            num_nodes = int(max(src.max(initial=-1), dst.max(initial=-1))) + 1
        if num_nodes < 1:
            raise SpecError("graph.num_nodes", num_nodes, "must be >= 1")
        bad = (src < 0) | (src >= num_nodes) | (dst < 0) | (dst >= num_nodes)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise SpecError("graph.edges", f"edge {i}: {int(src[i])} -> {int(dst[i])}",
                            f"node ids must be in [0, num_nodes = {num_nodes})")
        id_dtype = np.int32 if num_nodes < 2**31 else np.int64
        if undirected:
            src, dst = _symmetric_edges(src.astype(np.int64), dst.astype(np.int64), num_nodes)
        indptr, indices = _csr(src.astype(id_dtype), dst.astype(np.int64), num_nodes)
        graph = cls(name=name, num_nodes=num_nodes, indptr=indptr, indices=indices,
                    features=None if features is None else np.asarray(features, dtype=np.float32),
                    labels=None if labels is None else np.asarray(labels, dtype=np.int64),
                    train_mask=_mask(train_mask, num_nodes, "graph.train_mask"),
                    val_mask=_mask(val_mask, num_nodes, "graph.val_mask"),
                    test_mask=_mask(test_mask, num_nodes, "graph.test_mask"), symmetric=undirected)
        graph.validate()
        return graph

    def validate(self) -> None:
        """Row counts of node arrays, the CSR's shape and ids, a non-empty training set."""
        n = self.num_nodes
        if self.indptr.shape != (n + 1,) or self.indptr[0] != 0 or self.indptr[-1] != self.indices.size:
            raise SpecError("graph.indptr", f"{self.indptr.size} entries ending at {int(self.indptr[-1])}",
                            f"must have num_nodes + 1 = {n + 1} entries from 0 to num_edges = {self.indices.size}")
        if self.indices.size and (self.indices.min() < 0 or self.indices.max() >= n):
            raise SpecError("graph.indices", int(self.indices.max()), f"node ids must be in [0, num_nodes = {n})")
        for name in ("features", "labels", "train_mask", "val_mask", "test_mask", "communities"):
            arr = getattr(self, name)
            if arr is not None and arr.shape[0] != n:
                raise SpecError(f"graph.{name}", f"{arr.shape[0]} rows",
                                f"must have one row per node (num_nodes = {n})")
        if self.features is not None and self.features.ndim != 2:
            raise SpecError("graph.features", f"shape {self.features.shape}", "must be 2-D (nodes x feature_dim)")
        if self.labels is not None and self.labels.size and self.labels.min() < -1:
            raise SpecError("graph.labels", int(self.labels.min()), "must be class ids >= 0 (-1: unlabeled)")
        if self.train_mask is not None and not self.train_mask.any():
            raise SpecError("graph.train_mask", "0 training nodes", "needs at least one training node")


def _mask(mask: Any, num_nodes: int, field_name: str) -> np.ndarray | None:
    """A boolean mask of one entry per node, from booleans or from node ids."""
    if mask is None:
        return None
    mask = np.asarray(mask)
    if mask.dtype == bool:
        return mask
    ids = mask.astype(np.int64).ravel()
    if ids.size and (ids.min() < 0 or ids.max() >= num_nodes):
        bad = int(ids[(ids < 0) | (ids >= num_nodes)][0])
        raise SpecError(field_name, bad, f"node ids must be in [0, num_nodes = {num_nodes})")
    out = np.zeros(num_nodes, dtype=bool)
    out[ids] = True
    return out


def _symmetric_edges(src: np.ndarray, dst: np.ndarray, num_nodes: int) -> tuple[np.ndarray, np.ndarray]:
    """Both directions of every distinct undirected edge, self loops dropped."""
    lo, hi = np.minimum(src, dst), np.maximum(src, dst)
    keep = lo != hi
    keys = sorted_unique(lo[keep] * num_nodes + hi[keep])
    lo, hi = keys // num_nodes, keys % num_nodes
    return np.concatenate([lo, hi]), np.concatenate([hi, lo])


def sorted_unique(values: np.ndarray) -> np.ndarray:
    """`np.unique` by sorting: numpy 2's hash-based unique is several times slower on int64 ids."""
    values = np.sort(values)
    if values.size == 0:
        return values
    return values[np.concatenate([[True], values[1:] != values[:-1]])]


def _csr(src: np.ndarray, dst: np.ndarray, num_nodes: int) -> tuple[np.ndarray, np.ndarray]:
    """CSR of in-edges: rows are destinations, entries the sources (kept in input order per row)."""
    order = np.argsort(dst, kind="stable")
    indptr = np.zeros(num_nodes + 1, dtype=np.int64)
    np.cumsum(np.bincount(dst, minlength=num_nodes), out=indptr[1:])
    return indptr, src[order]


# --- the generator ---------------------------------------------------------------------------


def generate_graph(spec: GraphSpec) -> Graph:
    """Build the graph a statistical spec describes; the same spec (and seed) gives the same graph."""
    if spec.files is not None:
        raise SpecError("graph.files", spec.files.edges, "a graph with files is loaded, not generated")
    _check_generable(spec)
    rng = np.random.default_rng(spec.seed)
    n, c = spec.num_nodes, spec.num_communities
    communities = rng.permutation(np.arange(n, dtype=np.int32) % c)
    weights = _degree_weights(spec, rng)
    src, dst = _draw_edges(spec, communities, weights, rng)
    labels = communities.astype(np.int64) % spec.num_classes
    train, val, test = _split_masks(spec, rng, communities)
    features = _class_features(spec, labels, rng)
    indptr, indices = _csr(src.astype(np.int32 if n < 2**31 else np.int64), dst, n)
    graph = Graph(name=spec.name or "generated", num_nodes=n, indptr=indptr, indices=indices,
                  features=features, labels=labels, train_mask=train, val_mask=val, test_mask=test,
                  communities=communities, symmetric=True)
    graph.validate()
    return graph


GENERATE_MAX = {"num_nodes": 200_000_000, "num_edges": 2_000_000_000, "feature values": 4_000_000_000}
"""The largest graph the generator builds in memory (about 30 GB at the edge limit); larger
statistical graphs are simulated from their statistics (`simulator.gnn.simulate`), not built."""


def _check_generable(spec: GraphSpec) -> None:
    sizes = {"num_nodes": spec.num_nodes, "num_edges": spec.num_edges,
             "feature values": (spec.num_nodes + spec.num_classes) * spec.feature_dim}
    for name, value in sizes.items():
        if value > GENERATE_MAX[name]:
            field = "graph.feature_dim" if name == "feature values" else f"graph.{name}"
            what = ("(num_nodes + num_classes) x feature_dim = " if name == "feature values" else "")
            raise SpecError(field, value, f"too large to generate: {what}{value:,} > {GENERATE_MAX[name]:,}; "
                            "the simulator predicts larger graphs from their statistics (simulate gnn), "
                            "but partition and the executor build the graph")


def _degree_weights(spec: GraphSpec, rng: np.random.Generator) -> np.ndarray:
    """Expected degrees: Pareto(exponent - 1) draws (P(k) ~ k^-exponent), or equal for poisson,
    capped at sqrt(edges) so no node is asked for more neighbors than a simple graph can give."""
    n = spec.num_nodes
    if spec.degree_distribution == "poisson":
        return np.ones(n)
    w = (1.0 - rng.random(n)) ** (-1.0 / (spec.degree_exponent - 1.0))
    return np.minimum(w, max(1.0, np.sqrt(spec.num_edges)))


def _draw_edges(spec: GraphSpec, communities: np.ndarray, weights: np.ndarray,
                rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """`num_edges / 2` distinct undirected edges (both directions returned), drawn in rounds
    until enough distinct ones exist (duplicates and self loops are dropped)."""
    n = spec.num_nodes
    target = spec.num_edges // 2
    # A table of node ids, each repeated in proportion to its weight (the lightest node 4 times),
    # ordered by community: a weighted draw is one random index, and a draw inside community c
    # one random index into c's contiguous range (no binary search per draw).
    by_comm = np.argsort(communities, kind="stable")
    copies = np.maximum(1, np.rint(4.0 * weights[by_comm] / weights.min())).astype(np.int64)
    table = np.repeat(by_comm.astype(np.int32 if n < 2**31 else np.int64), copies)
    comm_of_slot = np.repeat(communities[by_comm], copies)
    comm_end = np.searchsorted(comm_of_slot, np.arange(spec.num_communities), side="right")
    comm_start = np.searchsorted(comm_of_slot, np.arange(spec.num_communities), side="left")
    del comm_of_slot
    keys = np.empty(0, dtype=np.int64)
    draw = target
    for _ in range(8):
        if target == 0:
            break
        inside = rng.random(draw) < spec.intra_community_fraction
        u = table[rng.integers(0, table.size, draw)]
        cu = communities[u]
        lo = np.where(inside, comm_start[cu], 0)
        hi = np.where(inside, comm_end[cu], table.size)
        v = table[lo + (rng.random(draw) * (hi - lo)).astype(np.int64)]
        a, b = np.minimum(u, v).astype(np.int64), np.maximum(u, v).astype(np.int64)
        keep = a != b
        keys = sorted_unique(np.concatenate([keys, a[keep] * n + b[keep]]))
        if keys.size >= target:
            break
        draw = int((target - keys.size) * 1.3) + 16
    if keys.size > target:
        keys = np.sort(rng.choice(keys, size=target, replace=False))
    a, b = keys // n, keys % n
    return np.concatenate([a, b]), np.concatenate([b, a])


def _split_masks(spec: GraphSpec, rng: np.random.Generator, communities: np.ndarray | None = None
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Train, validation and test masks: nodes in a random order, labelled ones first. With
    `train_community_fraction` < 1 the nodes of that fraction of the communities (chosen at
    random) come first, so the labelled nodes are concentrated there."""
    n = spec.num_nodes
    order = rng.permutation(n)
    if spec.train_community_fraction < 1 and communities is not None:
        chosen = rng.permutation(spec.num_communities)[:max(1, round(spec.train_community_fraction
                                                                     * spec.num_communities))]
        inside = np.isin(communities[order], chosen)
        order = np.concatenate([order[inside], order[~inside]])
    counts = [spec.num_train_nodes, round(spec.val_fraction * n), round(spec.test_fraction * n)]
    masks, start = [], 0
    for count in counts:
        mask = np.zeros(n, dtype=bool)
        mask[order[start:start + count]] = True
        masks.append(mask)
        start += count
    return masks[0], masks[1], masks[2]


def _class_features(spec: GraphSpec, labels: np.ndarray, rng: np.random.Generator) -> np.ndarray | None:
    """Features = the class's mean (a random unit vector) + Gaussian noise of std `feature_noise`."""
    if spec.feature_dim == 0:
        return None
    means = rng.standard_normal((spec.num_classes, spec.feature_dim)).astype(np.float32)
    means /= np.linalg.norm(means, axis=1, keepdims=True)
    noise = rng.standard_normal((spec.num_nodes, spec.feature_dim), dtype=np.float32)
    return means[labels] + np.float32(spec.feature_noise) * noise


# --- loading files ---------------------------------------------------------------------------


def load_graph_files(spec: GraphSpec) -> Graph:
    """Read a real graph (CSV, .npz, or the OGB layout) and check it against the spec's figures."""
    files = spec.files
    if files is None:
        raise SpecError("graph.files", None, "a statistical graph is generated, not loaded")
    if files.format == "ogb":
        arrays = _read_ogb(Path(files.edges))
    else:
        arrays = {"edges": _read_edges(Path(files.edges), files.format)}
    for name in ("features", "labels", "train_mask"):
        path = getattr(files, name)
        if path is not None:
            arrays[name] = _read_array(Path(path), f"graph.files.{name}")
    src, dst = arrays["edges"]
    graph = Graph.from_edges(src, dst, spec.num_nodes or arrays.get("num_nodes"), undirected=files.undirected,
                             features=arrays.get("features"), labels=_labels(arrays.get("labels")),
                             train_mask=arrays.get("train_mask"), val_mask=arrays.get("val_mask"),
                             test_mask=arrays.get("test_mask"), name=spec.name or Path(files.edges).stem)
    if spec.num_edges is not None and spec.num_edges != graph.num_edges:
        raise SpecError("graph.num_edges", spec.num_edges,
                        f"the files hold {graph.num_edges} stored edges (undirected edges count twice)")
    return graph


def build_graph(spec: Any) -> Graph:
    """Generate a statistical graph or load one from files: a spec, catalog name, path or mapping."""
    from simulator.specs.catalog import load_graph

    spec = load_graph(spec)
    return load_graph_files(spec) if spec.files is not None else generate_graph(spec)


def _labels(labels: np.ndarray | None) -> np.ndarray | None:
    """Class ids as int64, NaN (OGB's unlabeled nodes) as -1."""
    if labels is None:
        return None
    labels = np.asarray(labels).reshape(labels.shape[0], -1)[:, 0]
    if np.issubdtype(labels.dtype, np.floating):
        labels = np.where(np.isnan(labels), -1, labels)
    return labels.astype(np.int64)


def _exists(path: Path) -> Path:
    if not path.exists():
        raise FileNotFoundError(2, "file not found", str(path))
    return path


def _read_csv(path: Path, dtype: Any = None) -> np.ndarray:
    """A headerless or one-header-line numeric CSV (optionally .gz) as a 2-D array."""
    import pandas as pd

    _exists(path)
    first = pd.read_csv(path, header=None, nrows=1).iloc[0].tolist()
    header = any(isinstance(v, str) and not _is_number(v) for v in first)
    return pd.read_csv(path, header=0 if header else None, dtype=dtype).to_numpy()


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _read_edges(path: Path, fmt: str) -> tuple[np.ndarray, np.ndarray]:
    if fmt == "csv":
        table = _read_csv(path)
        if table.ndim != 2 or table.shape[1] < 2:
            raise SpecError("graph.files.edges", str(path), "a CSV edge list needs two columns: src,dst")
        return table[:, 0].astype(np.int64), table[:, 1].astype(np.int64)
    with np.load(_exists(path)) as data:
        if "edge_index" in data:
            return data["edge_index"][0].astype(np.int64), data["edge_index"][1].astype(np.int64)
        if "src" in data and "dst" in data:
            return data["src"].astype(np.int64), data["dst"].astype(np.int64)
        raise SpecError("graph.files.edges", str(path),
                        f"an .npz edge list needs arrays src and dst, or edge_index; it has {sorted(data)}")


def _read_array(path: Path, field_name: str) -> np.ndarray:
    """`.npy`, `.npz` (its first array) or CSV/text."""
    _exists(path)
    if path.suffix == ".npy":
        return np.load(path)
    if path.suffix == ".npz":
        with np.load(path) as data:
            return data[next(iter(data))]
    table = _read_csv(path)
    return table[:, 0] if table.shape[1] == 1 else table


def _first(root: Path, *names: str) -> Path | None:
    return next((root / n for n in names if (root / n).exists()), None)


def _read_ogb(root: Path) -> dict[str, Any]:
    """The OGB node-property layout: raw/ edges, features, labels, node count; split/<name>/ ids."""
    raw = _exists(root) / "raw"
    arrays: dict[str, Any] = {}
    npz = _first(raw, "data.npz")
    if npz is not None:  # the layout of the large OGB datasets (ogbn-papers100M)
        with np.load(npz) as data:
            arrays["edges"] = (data["edge_index"][0].astype(np.int64), data["edge_index"][1].astype(np.int64))
            if "node_feat" in data:
                arrays["features"] = data["node_feat"]
            if "num_nodes_list" in data:
                arrays["num_nodes"] = int(np.asarray(data["num_nodes_list"]).sum())
    else:
        edges = _first(raw, "edge.csv.gz", "edge.csv")
        if edges is None:
            raise SpecError("graph.files.edges", str(root), "an OGB directory needs raw/edge.csv[.gz] or raw/data.npz")
        table = _read_csv(edges)
        arrays["edges"] = (table[:, 0].astype(np.int64), table[:, 1].astype(np.int64))
        feats = _first(raw, "node-feat.csv.gz", "node-feat.csv")
        if feats is not None:
            arrays["features"] = _read_csv(feats, dtype=np.float32)
        count = _first(raw, "num-node-list.csv.gz", "num-node-list.csv")
        if count is not None:
            arrays["num_nodes"] = int(_read_csv(count).sum())
    labels = _first(raw, "node-label.npz", "node-label.csv.gz", "node-label.csv")
    if labels is not None:
        arrays["labels"] = _read_array(labels, "graph.files.labels") if labels.suffix == ".npz" else _read_csv(labels)
    splits = sorted(p for p in (root / "split").glob("*") if p.is_dir()) if (root / "split").is_dir() else []
    if splits:
        for name, key in (("train", "train_mask"), ("valid", "val_mask"), ("test", "test_mask")):
            path = _first(splits[0], f"{name}.csv.gz", f"{name}.csv")
            if path is not None:
                arrays[key] = _read_csv(path)[:, 0].astype(np.int64)
    return arrays
