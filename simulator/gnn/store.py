"""The on-disk partition layout: written once by `simtune partition --out DIR`, read by trainers.

As in DGL, partitioning is an offline step and trainers only read its output. A partition
directory holds:

```
DIR/
  partition.json      metadata: format, version, graph name and sizes, method, num_parts,
                      halo_hops (1), edge cut, balance and loads per constraint, and per part its
                      directory, counts and files (below)
  node_map.npy        int32 [num_nodes]: the part that owns each node (global ids)
  part0/
    owned.npy         int64 [n]: global ids of the nodes this part owns, sorted
    indptr.npy        int64 [n + 1]: CSR over the owned nodes' in-edges ...
    indices.npy       int64 [e]: ... whose sources are global ids (local or halo)
    halo.npy          int64 [h]: global ids of the remote in-neighbors of owned nodes, sorted
    features.npy      float32 [n, feature_dim]   (when the graph has features)
    labels.npy        int64 [n]                  (when it has labels; -1: unlabeled)
    train_mask.npy    bool [n]; val_mask.npy, test_mask.npy likewise (when it has them)
  part1/ ...
  <graph>.json        with --emit dgl: DGL's partition config (below)
  dgl_orig_nids.npy   with --emit dgl: int64 [num_nodes], DGL's new node id -> original id
```

Every array is a plain `.npy` (numpy.load reads it; nothing else is needed). The directory is
written as a whole into a temporary directory beside DIR and renamed into place, so a reader
sees the previous complete partition or the new one, never a mix.

`--emit dgl` adds the JSON config `dgl.distributed.partition_graph` writes (DGL 1.x: graph_name,
num_nodes, num_edges, part_method, num_parts, halo_hops, node_map and edge_map as contiguous
[start, end) id ranges per part, ntypes, etypes, and `part-N` entries naming `node_feats`,
`edge_feats` and `part_graph` files). DGL numbers nodes part by part (owned nodes of part 0
first, in ascending original id, then part 1, ...) and edges by the part of their destination;
`dgl_orig_nids.npy` maps those ids back. The binary files the config names
(`partN/graph.dgl`, `partN/node_feat.dgl`, `partN/edge_feat.dgl`) are DGL's own serialization and
are not written here: a DGL user builds them from `partN/*.npy` with `dgl.save_graphs` and
`dgl.data.utils.save_tensors`, or reads the config for the node/edge maps alone.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from simulator.errors import SpecError
from simulator.gnn.graph import Graph
from simulator.gnn.partition import Partition

FORMAT = "simtune-gnn-partition"
VERSION = 1
METADATA = "partition.json"
NODE_MAP = "node_map.npy"
NODE_ARRAYS = ("features", "labels", "train_mask", "val_mask", "test_mask")


@dataclass(frozen=True, eq=False)
class PartitionData:
    """One part as a trainer reads it: its owned nodes, their in-edges, halo and node data."""

    part: int
    num_parts: int
    num_nodes: int
    owned: np.ndarray
    indptr: np.ndarray
    indices: np.ndarray
    halo: np.ndarray
    node_map: np.ndarray
    features: np.ndarray | None
    labels: np.ndarray | None
    train_mask: np.ndarray | None
    val_mask: np.ndarray | None
    test_mask: np.ndarray | None
    meta: dict[str, Any]

    def local_index(self, global_ids: np.ndarray) -> np.ndarray:
        """Positions of `global_ids` among the owned nodes, -1 where this part does not own them."""
        ids = np.asarray(global_ids, dtype=np.int64)
        if self.owned.size == 0:
            return np.full(ids.shape, -1, dtype=np.int64)
        pos = np.minimum(np.searchsorted(self.owned, ids), self.owned.size - 1)
        return np.where(self.owned[pos] == ids, pos, -1)


def write_partition(out_dir: str | os.PathLike, graph: Graph, partition: Partition, *,
                    emit_dgl: bool = False) -> Path:
    """Write the layout above into `out_dir` (replacing a previous partition there); returns the
    metadata file's path. `out_dir` must be absent, empty, or a partition directory."""
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / METADATA).exists():
        raise SpecError("--out", str(out_dir), f"must be a new or empty directory, or a partition "
                        f"directory (one with {METADATA}); it holds other files")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.", suffix=".tmp"))
    try:
        meta = _write_parts(tmp, graph, partition)
        if emit_dgl:
            meta["dgl_config"] = _write_dgl(tmp, graph, partition)
        (tmp / METADATA).write_text(json.dumps(meta, indent=2) + "\n")
        os.chmod(tmp, 0o755)
        _swap_into_place(tmp, out_dir)
    except OSError as e:  # a full disk: the error names the partition, not the temporary folder
        shutil.rmtree(tmp, ignore_errors=True)
        raise OSError(e.errno, e.strerror or str(e), str(out_dir)) from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir / METADATA


def _swap_into_place(tmp: Path, out_dir: Path) -> None:
    """Rename `tmp` to `out_dir`; an existing `out_dir` is moved aside first and then removed."""
    old = None
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _write_parts(root: Path, graph: Graph, partition: Partition) -> dict[str, Any]:
    np.save(root / NODE_MAP, partition.parts.astype(np.int32))
    parts = []
    for p in range(partition.num_parts):
        owned = partition.owned(p)
        starts, ends = graph.indptr[owned], graph.indptr[owned + 1]
        counts = ends - starts
        indptr = np.zeros(owned.size + 1, dtype=np.int64)
        np.cumsum(counts, out=indptr[1:])
        # gather the owned rows' slices of indices without a Python loop
        offsets = np.repeat(starts - indptr[:-1], counts) + np.arange(indptr[-1])
        arrays = {"owned": owned, "indptr": indptr, "indices": graph.indices[offsets].astype(np.int64),
                  "halo": partition.halo[p].astype(np.int64)}
        for name in NODE_ARRAYS:
            value = getattr(graph, name)
            if value is not None:
                arrays[name] = value[owned]
        part_dir = root / f"part{p}"
        part_dir.mkdir()
        for name, value in arrays.items():
            np.save(part_dir / f"{name}.npy", value)
        train = graph.train_mask[owned].sum() if graph.train_mask is not None else owned.size
        parts.append({"dir": f"part{p}", "owned_nodes": int(owned.size), "in_edges": int(indptr[-1]),
                      "halo_nodes": int(partition.halo[p].size), "train_nodes": int(train),
                      "files": {name: f"part{p}/{name}.npy" for name in arrays}})
    return {
        "format": FORMAT, "version": VERSION, "graph_name": graph.name, "num_nodes": graph.num_nodes,
        "num_edges": graph.num_edges, "feature_dim": graph.feature_dim, "num_classes": graph.num_classes,
        "method": partition.method, "num_parts": partition.num_parts, "halo_hops": 1,
        "edge_cut": partition.edge_cut, "edge_cut_fraction": partition.edge_cut_fraction,
        "balance": partition.balance, "loads": partition.loads, "node_map": NODE_MAP, "parts": parts,
    }


def dgl_config(graph: Graph, partition: Partition) -> tuple[dict[str, Any], np.ndarray]:
    """DGL's partition config for this partition, and its new-id -> original-id node map."""
    orig_nids = np.concatenate([partition.owned(p) for p in range(partition.num_parts)])
    node_counts = np.bincount(partition.parts, minlength=partition.num_parts)
    edge_counts = np.bincount(partition.parts, weights=graph.in_degrees, minlength=partition.num_parts)
    method = "random" if partition.method == "random" else "metis"

    def ranges(counts: np.ndarray) -> list[list[int]]:
        ends = np.cumsum(counts.astype(np.int64))
        return [[int(e - c), int(e)] for c, e in zip(counts.astype(np.int64), ends)]

    config: dict[str, Any] = {
        "graph_name": graph.name, "num_nodes": graph.num_nodes, "num_edges": graph.num_edges,
        "part_method": method, "num_parts": partition.num_parts, "halo_hops": 1,
        "node_map": {"_N": ranges(node_counts)}, "edge_map": {"_N:_E:_N": ranges(edge_counts)},
        "ntypes": {"_N": 0}, "etypes": {"_N:_E:_N": 0},
    }
    for p in range(partition.num_parts):
        config[f"part-{p}"] = {"node_feats": f"part{p}/node_feat.dgl", "edge_feats": f"part{p}/edge_feat.dgl",
                               "part_graph": f"part{p}/graph.dgl"}
    return config, orig_nids


def _write_dgl(root: Path, graph: Graph, partition: Partition) -> str:
    config, orig_nids = dgl_config(graph, partition)
    name = f"{graph.name}.json"
    (root / name).write_text(json.dumps(config, indent=2) + "\n")
    np.save(root / "dgl_orig_nids.npy", orig_nids)
    return name


def read_metadata(out_dir: str | os.PathLike) -> dict[str, Any]:
    """The metadata JSON of a partition directory, checked for its format and version."""
    path = Path(out_dir) / METADATA
    if not path.exists():
        raise SpecError("partition", str(out_dir), f"is not a partition directory (no {METADATA}); "
                        "write one with `simtune partition --out DIR`")
    meta = json.loads(path.read_text())
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise SpecError("partition", f"{meta.get('format')} v{meta.get('version')}",
                        f"must be {FORMAT} v{VERSION}")
    return meta


def load_partition(out_dir: str | os.PathLike, part: int) -> PartitionData:
    """Read part `part` of the partition in `out_dir`."""
    out_dir = Path(out_dir)
    meta = read_metadata(out_dir)
    if not 0 <= part < meta["num_parts"]:
        raise SpecError("part", part, f"must be in [0, num_parts = {meta['num_parts']})")
    files = meta["parts"][part]["files"]

    def load(name: str) -> np.ndarray | None:
        return np.load(out_dir / files[name]) if name in files else None

    return PartitionData(part=part, num_parts=meta["num_parts"], num_nodes=meta["num_nodes"],
                         owned=load("owned"), indptr=load("indptr"), indices=load("indices"),
                         halo=load("halo"), node_map=np.load(out_dir / meta["node_map"]),
                         **{name: load(name) for name in NODE_ARRAYS}, meta=meta)
