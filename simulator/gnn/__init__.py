"""GNN training (DistDGL's design): graphs, partitions, the on-disk partition store.

What this package provides, in the order data flows (spec -> graph -> partition -> store):

`simulator.gnn.graph`
    `Graph`: a node-classification graph in CSR form over in-edges.
        `name: str`, `num_nodes: int`,
        `indptr: np.ndarray[int64]` (num_nodes + 1), `indices: np.ndarray[int32 | int64]`
        (num_edges): the in-neighbors (edge sources) of node v are `indices[indptr[v]:indptr[v+1]]`,
        the nodes a neighbor sampler draws for v. An undirected edge is stored both ways.
        `features: np.ndarray[float32] | None` (num_nodes, feature_dim),
        `labels: np.ndarray[int64] | None` (num_nodes,),
        `train_mask`, `val_mask`, `test_mask: np.ndarray[bool] | None` (num_nodes,),
        `communities: np.ndarray[int32] | None` (generated graphs: each node's block).
        Properties: `num_edges`, `feature_dim`, `num_classes`, `in_degrees`, `train_nodes`.
        `Graph.from_edges(src, dst, num_nodes=None, *, undirected=False, features=None, labels=None,
        train_mask=None, val_mask=None, test_mask=None, name="graph") -> Graph` validates: an edge
        past the node count, a feature/label/mask row count that does not match, an empty training
        set all raise SpecError naming field, value and what is allowed.
    `generate_graph(spec: GraphSpec) -> Graph`: degree-corrected stochastic block model with
        power-law degrees and communities, features around a per-class mean, masks; seeded.
    `load_graph_files(spec: GraphSpec) -> Graph`: CSV, .npz or the OGB on-disk layout.
    `build_graph(spec: GraphSpec | str | Path | dict) -> Graph`: either of the two by the spec's kind.

`simulator.gnn.partition`
    `METHODS = ("metis", "random", "metis-balanced")`; `BALANCE_TOLERANCE = 0.05`.
    `partition_graph(graph: Graph, num_parts: int, method: str = "metis", seed: int = 0) -> Partition`.
    `Partition`: `method: str`, `num_parts: int`, `parts: np.ndarray[int32]` (node -> part),
        `halo: list[np.ndarray[int64]]` (per part, sorted global ids of the remote in-neighbors of
        its owned nodes), `edge_cut: int` (stored edges whose ends lie in different parts),
        `edge_cut_fraction: float`, `loads: dict[str, list[int]]` (per constraint `nodes`, `edges`,
        `train_nodes`: the amount each part holds), `balance: dict[str, float]` (max / mean of each),
        `seconds: float`; methods `owned(part) -> np.ndarray[int64]`, `halo_sizes() -> list[int]`,
        `to_dict() -> dict` (what `simtune partition --json` prints).
    `halo_nodes(graph, parts, num_parts) -> list[np.ndarray]`, `edge_cut(graph, parts) -> int`.

`simulator.gnn.store` (the layout that `simtune partition --out DIR` writes; see its docstring)
    `write_partition(out_dir, graph: Graph, partition: Partition, *, emit_dgl: bool = False) -> Path`
        (returns the metadata JSON's path).
    `load_partition(out_dir, part: int) -> PartitionData`.
    `PartitionData`: `part: int`, `num_parts: int`, `num_nodes: int` (global), `owned: np.ndarray[int64]`
        (sorted global ids), `indptr: np.ndarray[int64]` (len(owned) + 1), `indices: np.ndarray[int64]`
        (global ids of each owned node's in-neighbors), `halo: np.ndarray[int64]`,
        `node_map: np.ndarray[int32]` (global id -> owning part, every node),
        `features`, `labels`, `train_mask`, `val_mask`, `test_mask` (rows of the owned nodes, or None),
        `meta: dict` (the metadata JSON); methods `local_index(global_ids) -> np.ndarray` (position
        among owned, -1 where not owned).
    `read_metadata(out_dir) -> dict`.
"""
