"""Node features of a trainer rank: its own rows, the cached rows of hot remote nodes, and the
fetch of everything else from the owning ranks.

    placement "partitioned" (DistDGL's KVStore: each machine serves its own nodes' rows)
        table = owned rows + cache rows        where[v] = row of v in table, or -1
        fetch(ids): rows with where >= 0 are read here                     -> fetch_local
                    the rest: all-to-all of their ids to the owners, the owners read
                    their rows, all-to-all of the rows back                 -> fetch_remote
    placement "replicated": every rank holds every row; fetch is a local read

The cache (`feature_cache_fraction`): the first fraction of this rank's halo nodes (the
remote in-neighbors of its owned nodes), ordered by how many owned nodes list them as an
in-neighbor (the number of local edges from them: how often a one-hop sample can draw them),
most first. Its rows are fetched once, when the store is built, through the same all-to-all.

Rows are stored and sent in the plan's `feature_dtype` and widened to fp32 for the model.
`remote_bytes` counts the feature bytes this rank received from other ranks.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from executor.gnn.exchange import Exchange, split_by_owner

TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def hottest_halo(halo: np.ndarray, indices: np.ndarray, fraction: float) -> np.ndarray:
    """The first `fraction` of `halo` by the number of local edges from each node, most first."""
    n = int(round(fraction * halo.size))
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    uses = np.searchsorted(halo, indices)
    uses = uses[(uses < halo.size) & (halo[np.minimum(uses, halo.size - 1)] == indices)]
    counts = np.bincount(uses, minlength=halo.size)
    return np.sort(halo[np.argsort(-counts, kind="stable")[:n]])


class FeatureStore:
    """Feature rows of every node as one rank sees them (see the module docstring)."""

    def __init__(self, rows: np.ndarray, row_nodes: np.ndarray, node_map: np.ndarray, exchange: Exchange,
                 dtype: str = "fp32", *, replicated: bool = False, cache_nodes: np.ndarray | None = None):
        """`rows`: the features of `row_nodes` (this rank's owned nodes, or every node when
        `replicated`). `cache_nodes`: remote nodes whose rows to fetch now and keep."""
        self.node_map, self.exchange, self.replicated = node_map, exchange, replicated
        self.table = torch.from_numpy(np.ascontiguousarray(rows)).to(TORCH_DTYPES[dtype])
        self.where = np.full(node_map.size, -1, dtype=np.int64)
        self.where[row_nodes] = np.arange(row_nodes.size)
        self.remote_bytes = 0
        self.remote_rows = 0
        self.cached_nodes = 0
        if not replicated:  # every rank takes part in filling the cache, even with nothing to cache
            cache_nodes = np.zeros(0, np.int64) if cache_nodes is None else np.asarray(cache_nodes, np.int64)
            cached = self._fetch_remote(cache_nodes)
            self.where[cache_nodes] = self.table.shape[0] + np.arange(cache_nodes.size)
            self.table = torch.cat([self.table, cached])
            self.cached_nodes = int(cache_nodes.size)
            self.remote_bytes = self.remote_rows = 0  # the epoch counts start after the fill

    @property
    def row_bytes(self) -> int:
        return int(self.table.shape[1]) * self.table.element_size()

    def fetch(self, ids: np.ndarray, timings: dict[str, float]) -> torch.Tensor:
        """fp32 rows of `ids` (in that order); adds seconds to timings['fetch_local'/'fetch_remote']."""
        t0 = time.perf_counter()
        slot = self.where[ids]
        here = slot >= 0
        out = torch.empty((ids.size, self.table.shape[1]), dtype=self.table.dtype)
        out[torch.from_numpy(here)] = self.table[torch.from_numpy(slot[here])]
        t1 = time.perf_counter()
        if not self.replicated:
            away = np.flatnonzero(~here)
            out[torch.from_numpy(away)] = self._fetch_remote(ids[away])
        t2 = time.perf_counter()
        rows = out.float()
        t3 = time.perf_counter()
        timings["fetch_local"] = timings.get("fetch_local", 0.0) + (t1 - t0) + (t3 - t2)
        timings["fetch_remote"] = timings.get("fetch_remote", 0.0) + (t2 - t1)
        return rows

    def _fetch_remote(self, ids: np.ndarray) -> torch.Tensor:
        """Rows of `ids` (owned by other ranks) from their owners: ids out, rows back."""
        world = self.exchange.world_size
        asks, order = split_by_owner(ids, self.node_map[ids].astype(np.int64), world)
        asked = self.exchange.alltoallv([torch.from_numpy(a) for a in asks])
        served = [self.table[torch.from_numpy(self.where[a.numpy()])] for a in asked]
        got = self.exchange.alltoallv(served)
        rows = torch.empty((ids.size, self.table.shape[1]), dtype=self.table.dtype)
        rows[torch.from_numpy(order)] = torch.cat(got) if got else rows[:0]
        self.remote_rows += int(ids.size)
        self.remote_bytes += int(ids.size) * self.row_bytes
        return rows
