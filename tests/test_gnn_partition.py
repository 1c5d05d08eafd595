"""Graphs, partitions and the partition store, checked against independent counts.

Halo sets and edge cuts are recomputed here edge by edge from the edge list (plain Python
sets), not with the vectorized code under test.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from simtune.cli import app
from simulator.errors import SpecError
from simulator.gnn.graph import Graph, build_graph, generate_graph, load_graph_files
from simulator.gnn.partition import BALANCE_TOLERANCE, METHODS, partition_graph
from simulator.gnn.store import load_partition, read_metadata, write_partition
from simulator.specs.graph import GraphSpec

SMALL = {"name": "small", "num_nodes": 600, "num_edges": 6000, "feature_dim": 8, "num_classes": 4,
         "num_communities": 4, "train_fraction": 0.3, "seed": 3}


@pytest.fixture(scope="module")
def graph() -> Graph:
    return generate_graph(GraphSpec.parse(SMALL))


def edge_list(g: Graph) -> list[tuple[int, int]]:
    """(src, dst) pairs read row by row from the CSR."""
    return [(int(u), v) for v in range(g.num_nodes) for u in g.indices[g.indptr[v]:g.indptr[v + 1]]]


# --- the generator ------------------------------------------------------------------------------


def test_generator_is_reproducible_from_its_seed(graph):
    again = generate_graph(GraphSpec.parse(SMALL))
    for name in ("indptr", "indices", "features", "labels", "train_mask", "communities"):
        assert np.array_equal(getattr(graph, name), getattr(again, name)), name
    other = generate_graph(GraphSpec.parse({**SMALL, "seed": 4}))
    assert not np.array_equal(graph.indices, other.indices)


def test_generator_meets_its_statistics(graph):
    assert graph.num_edges == SMALL["num_edges"] and graph.symmetric
    assert graph.train_mask.sum() == 180 and not (graph.train_mask & graph.test_mask).any()
    edges = set(edge_list(graph))
    assert all((v, u) in edges for u, v in edges) and all(u != v for u, v in edges)  # symmetric, no loops
    same = graph.communities[graph.indices] == graph.communities[graph.destinations()]
    assert 0.6 < same.mean() < 0.9  # spec: 0.8 inside communities, a little less after de-duplication
    assert graph.in_degrees.max() > 4 * np.median(graph.in_degrees)  # heavy-tailed degrees


def test_generated_labels_are_learnable_from_features(graph):
    """Nearest class mean (fitted on the training nodes) beats chance by far."""
    train = graph.train_mask
    means = np.stack([graph.features[train & (graph.labels == c)].mean(0) for c in range(4)])
    guess = np.argmin(((graph.features[:, None, :] - means[None]) ** 2).sum(-1), axis=1)
    assert (guess[~train] == graph.labels[~train]).mean() > 0.5  # chance: 0.25


# --- partitioning -------------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_halo_sets_are_exactly_the_remote_neighbors(graph, method):
    part = partition_graph(graph, 3, method, seed=1)
    expected = [set() for _ in range(3)]
    for u, v in edge_list(graph):
        if part.parts[u] != part.parts[v]:
            expected[part.parts[v]].add(u)
    assert [set(h.tolist()) for h in part.halo] == expected
    assert all(np.all(np.diff(h) > 0) for h in part.halo)


@pytest.mark.parametrize("method", METHODS)
def test_edge_cut_matches_an_independent_count(graph, method):
    part = partition_graph(graph, 4, method, seed=1)
    cut = sum(part.parts[u] != part.parts[v] for u, v in edge_list(graph))
    assert part.edge_cut == cut
    assert part.edge_cut_fraction == pytest.approx(cut / graph.num_edges)
    loads = np.bincount(part.parts, minlength=4)
    assert part.loads["nodes"] == loads.tolist()
    assert part.balance["nodes"] == pytest.approx(loads.max() / loads.mean())


def test_metis_cuts_fewer_edges_than_random(graph):
    metis, rnd = partition_graph(graph, 4, "metis"), partition_graph(graph, 4, "random")
    assert metis.edge_cut_fraction < 0.6 * rnd.edge_cut_fraction


def test_metis_balanced_holds_every_constraint_within_the_tolerance():
    """Training nodes all in two communities: plain METIS (one weight: nodes) leaves them skewed."""
    g = generate_graph(GraphSpec.parse({**SMALL, "num_nodes": 2000, "num_edges": 20000, "seed": 5}))
    skewed = Graph(name="skewed", num_nodes=g.num_nodes, indptr=g.indptr, indices=g.indices,
                   train_mask=g.communities < 2, communities=g.communities, symmetric=True)
    plain = partition_graph(skewed, 4, "metis")
    balanced = partition_graph(skewed, 4, "metis-balanced")
    assert plain.balance["train_nodes"] > 1 + BALANCE_TOLERANCE
    for constraint, value in balanced.balance.items():
        assert value <= 1 + BALANCE_TOLERANCE + 1e-9, (constraint, value)
    assert balanced.edge_cut_fraction < partition_graph(skewed, 4, "random").edge_cut_fraction


@pytest.mark.parametrize("method", METHODS)
def test_a_single_partition_has_no_halo_and_no_cut(graph, method):
    part = partition_graph(graph, 1, method)
    assert part.edge_cut == 0 and part.halo_sizes() == [0]
    assert set(part.balance.values()) == {1.0}


# --- bad inputs -----------------------------------------------------------------------------------


def error_of(fn, *args, **kwargs) -> SpecError:
    with pytest.raises(SpecError) as info:
        fn(*args, **kwargs)
    return info.value


def test_an_edge_past_the_node_count_is_refused():
    e = error_of(Graph.from_edges, [0, 1, 2], [1, 2, 5], num_nodes=4)
    assert e.field == "graph.edges" and "edge 2: 2 -> 5" in str(e) and "[0, num_nodes = 4)" in str(e)


@pytest.mark.parametrize("parts", [0, -2])
def test_parts_below_one_are_refused(graph, parts):
    e = error_of(partition_graph, graph, parts)
    assert e.field == "parts" and "must be an integer >= 1" in str(e)


def test_unknown_method_is_refused(graph):
    assert "metis, random, metis-balanced" in str(error_of(partition_graph, graph, 2, "kahip"))


def test_an_empty_training_set_is_refused():
    e = error_of(Graph.from_edges, [0, 1], [1, 2], train_mask=np.zeros(3, dtype=bool))
    assert e.field == "graph.train_mask" and "at least one training node" in str(e)


def test_a_feature_file_with_the_wrong_row_count_is_refused(tmp_path):
    (tmp_path / "edges.csv").write_text("src,dst\n0,1\n1,2\n2,3\n")
    np.save(tmp_path / "feat.npy", np.zeros((3, 5), dtype=np.float32))
    spec = GraphSpec.parse({"name": "f", "files": {"format": "csv", "edges": str(tmp_path / "edges.csv"),
                                                   "features": str(tmp_path / "feat.npy")}})
    e = error_of(load_graph_files, spec)
    assert e.field == "graph.features" and "3 rows" in str(e) and "num_nodes = 4" in str(e)


# --- loaders --------------------------------------------------------------------------------------


def test_csv_npz_and_ogb_layouts_give_the_same_graph(tmp_path):
    src, dst = np.array([0, 1, 2, 3, 0]), np.array([1, 2, 3, 4, 4])
    (tmp_path / "e.csv").write_text("".join(f"{u},{v}\n" for u, v in zip(src, dst)))
    np.savez(tmp_path / "e.npz", src=src, dst=dst)
    ogb = tmp_path / "ogb"
    (ogb / "raw").mkdir(parents=True)
    (ogb / "split" / "random").mkdir(parents=True)
    (ogb / "raw" / "edge.csv").write_text((tmp_path / "e.csv").read_text())
    (ogb / "raw" / "num-node-list.csv").write_text("5\n")
    (ogb / "raw" / "node-label.csv").write_text("0\n1\n0\n1\n0\n")
    (ogb / "split" / "random" / "train.csv").write_text("0\n3\n")
    graphs = [load_graph_files(GraphSpec.parse({"name": "g", "files": {"format": f, "edges": str(tmp_path / p)}}))
              for f, p in (("csv", "e.csv"), ("npz", "e.npz"), ("ogb", "ogb"))]
    for g in graphs:
        assert g.num_nodes == 5 and g.num_edges == 10  # undirected: both ways
        assert np.array_equal(g.indptr, graphs[0].indptr) and np.array_equal(g.indices, graphs[0].indices)
    assert graphs[2].train_nodes.tolist() == [0, 3] and graphs[2].labels.tolist() == [0, 1, 0, 1, 0]


# --- the store -----------------------------------------------------------------------------------


def test_the_store_round_trips(graph, tmp_path):
    part = partition_graph(graph, 3, "metis-balanced")
    meta_path = write_partition(tmp_path / "p", graph, part, emit_dgl=True)
    meta = read_metadata(meta_path.parent)
    assert meta["num_parts"] == 3 and meta["num_edges"] == graph.num_edges
    owned_all = []
    for p in range(3):
        data = load_partition(tmp_path / "p", p)
        assert np.array_equal(data.owned, part.owned(p)) and np.array_equal(data.halo, part.halo[p])
        assert np.array_equal(data.node_map, part.parts)
        for i, v in enumerate(data.owned[:50]):
            row = graph.indices[graph.indptr[v]:graph.indptr[v + 1]]
            assert np.array_equal(data.indices[data.indptr[i]:data.indptr[i + 1]], row)
        assert np.array_equal(data.features, graph.features[data.owned])
        assert np.array_equal(data.train_mask, graph.train_mask[data.owned])
        assert data.local_index(data.owned[[3, 0]]).tolist() == [3, 0]
        assert data.local_index(data.halo[:2]).tolist() == [-1, -1]
        owned_all.append(data.owned)
    assert np.array_equal(np.sort(np.concatenate(owned_all)), np.arange(graph.num_nodes))
    dgl = json.loads((tmp_path / "p" / "small.json").read_text())
    assert dgl["num_parts"] == 3 and dgl["halo_hops"] == 1 and dgl["part-2"]["part_graph"] == "part2/graph.dgl"
    assert dgl["node_map"]["_N"][-1][1] == graph.num_nodes and dgl["edge_map"]["_N:_E:_N"][-1][1] == graph.num_edges
    write_partition(tmp_path / "p", graph, partition_graph(graph, 2, "random"))  # replaced as a whole
    assert read_metadata(tmp_path / "p")["num_parts"] == 2 and not (tmp_path / "p" / "part2").exists()


def test_the_store_refuses_a_directory_of_other_files(graph, tmp_path):
    (tmp_path / "mine.txt").write_text("keep")
    e = error_of(write_partition, tmp_path, graph, partition_graph(graph, 2, "random"))
    assert e.field == "--out" and (tmp_path / "mine.txt").exists()


# --- the command ---------------------------------------------------------------------------------


def test_partition_command_json_and_errors(tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["partition", "--graph", "community-20k", "--parts", "2", "--method",
                                 "metis-balanced", "--json", "--out", str(tmp_path / "out"), "--emit", "dgl"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert {"edge_cut_fraction", "balance", "halo_nodes"} <= set(report)
    assert len(report["halo_nodes"]) == 2 and (tmp_path / "out" / "community-20k.json").exists()
    bad = runner.invoke(app, ["partition", "--graph", "community-20k", "--parts", "0"])
    assert bad.exit_code == 2 and "--parts = 0" in bad.stderr


def test_build_graph_takes_a_catalog_name():
    g = build_graph("community-20k")
    assert g.num_nodes == 20_000 and g.num_edges == 400_000 and g.feature_dim == 32
