"""GNN specs: graphs, models and plans load from the catalog, round-trip, and refuse bad fields
by name; the GNN machines follow the NxNODE and Nxcpu cluster naming."""

from __future__ import annotations

import pytest

from simulator.errors import SpecError
from simulator.specs.catalog import (
    CATALOG_DIR,
    catalog_names,
    load_cluster,
    load_gnn_model,
    load_gnn_plan,
    load_graph,
)
from simulator.specs.gnn import GNNModelSpec, GNNPlan
from simulator.specs.graph import GraphSpec

LOADERS = {"graphs": (load_graph, GraphSpec), "gnn_models": (load_gnn_model, GNNModelSpec),
           "gnn_plans": (load_gnn_plan, GNNPlan)}
ENTRIES = [(kind, name) for kind in LOADERS for name in catalog_names(kind)[kind]]


@pytest.mark.parametrize("kind,name", ENTRIES)
def test_gnn_catalog_entries_load_and_round_trip(kind, name):
    load, cls = LOADERS[kind]
    spec = load(name)
    assert isinstance(spec, cls)
    assert cls.parse(spec.to_dict()) == spec
    assert load(CATALOG_DIR / kind / f"{name}.yaml") == spec


def test_published_graph_statistics():
    products, papers = load_graph("ogbn-products"), load_graph("ogbn-papers100m")
    assert (products.num_nodes, products.num_edges, products.feature_dim) == (2_449_029, 123_718_280, 100)
    assert (papers.num_nodes, papers.num_edges, papers.feature_dim) == (111_059_956, 3_231_371_744, 128)
    assert products.num_train_nodes == pytest.approx(196_615, rel=1e-3)
    assert papers.num_train_nodes == pytest.approx(1_207_179, rel=1e-3)


def test_distdgl_model_and_plan():
    sage = load_gnn_model("graphsage-3")
    assert (sage.architecture, sage.num_layers, sage.hidden_size, sage.fanouts) == ("graphsage", 3, 256, [15, 10, 5])
    assert load_gnn_model("gat-3").num_heads == 4
    plan = load_gnn_plan("distdgl-default")
    assert plan.partition == "metis-balanced" and plan.batch_size_per_trainer == 2000 and plan.feature_bytes == 4


def test_gnn_machines_use_the_nxnode_naming():
    one = load_cluster("m5n-24xlarge")
    sixteen = load_cluster("16xm5n-24xlarge")
    assert (sixteen.num_nodes, sixteen.num_devices, sixteen.name) == (16, 16, "16xm5n-24xlarge")
    assert sixteen.device == one.device and sixteen.inter_node_bandwidth_GBps == 12.5  # 100 Gb/s
    assert one.device.memory_GiB == 384
    assert load_cluster("4xg5-8xlarge").num_devices == 4
    big = load_cluster("2xg5-24xlarge")
    assert (big.num_nodes, big.devices_per_node, big.device.name) == (2, 4, "A10G")
    assert load_cluster("16x8xa100-80gb").num_devices == 128  # the older form still parses
    # core counts (AWS EC2 pages): per machine, carried over by the NxNODE rule
    assert (sixteen.host_cores_per_node, sixteen.host_vcpus_per_node) == (48, 96)
    assert (load_cluster("4xg5-8xlarge").host_cores_per_node, big.host_vcpus_per_node) == (16, 96)
    assert load_cluster("2xcpu").host_cores_per_node is None   # one-core ranks: no machine layout


def test_nxcpu_is_n_one_core_ranks_like_the_catalog_entries():
    one = load_cluster("1xcpu")
    for n in (1, 2):  # the catalog's entries are what the rule builds from 1xcpu
        named = load_cluster(f"{n}xcpu")
        assert named == one.model_copy(update={"name": f"{n}xcpu", "devices_per_node": n})
    four = load_cluster("4xcpu")
    assert (four.num_nodes, four.devices_per_node, four.name) == (1, 4, "4xcpu")
    assert four.device == load_cluster("1xcpu").device


def error_of(fn, *args) -> str:
    with pytest.raises(SpecError) as info:
        fn(*args)
    return str(info.value)


@pytest.mark.parametrize("data,field,words", [
    ({"num_nodes": 10}, "graph.num_edges", "required by a statistical graph"),
    ({"num_nodes": 10, "num_edges": 20, "train_fraction": 0}, "graph.train_fraction", "greater than 0"),
    ({"num_nodes": 10, "num_edges": 20, "train_fraction": 0.9, "test_fraction": 0.2}, "graph.train_fraction",
     "must be <= 1"),
    ({"num_nodes": 10, "num_edges": 20, "num_communities": 11}, "graph.num_communities", "<= num_nodes"),
    ({"num_nodes": 10, "num_edges": 20, "train_community_fraction": 0}, "graph.train_community_fraction",
     "greater than 0"),
    ({"files": {"format": "parquet", "edges": "e.parquet"}}, "graph.files.format", "'csv', 'npz' or 'ogb'"),
])
def test_bad_graph_fields_are_named(data, field, words):
    msg = error_of(GraphSpec.parse, data)
    assert msg.startswith(field) and words in msg, msg


@pytest.mark.parametrize("data,field,words", [
    ({"architecture": "gin", "num_layers": 2, "hidden_size": 8, "fanouts": [5, 5]}, "gnn_model.architecture",
     "'graphsage', 'gcn' or 'gat'"),
    ({"architecture": "gcn", "num_layers": 3, "hidden_size": 8, "fanouts": [5, 5]}, "gnn_model.fanouts",
     "one entry per layer"),
    ({"architecture": "gcn", "num_layers": 1, "hidden_size": 8, "fanouts": [5], "num_heads": 2},
     "gnn_model.num_heads", "only gat"),
    ({"architecture": "gat", "num_layers": 1, "hidden_size": 10, "fanouts": [5], "num_heads": 4},
     "gnn_model.hidden_size", "divisible by num_heads"),
])
def test_bad_model_fields_are_named(data, field, words):
    msg = error_of(GNNModelSpec.parse, data)
    assert msg.startswith(field) and words in msg, msg


@pytest.mark.parametrize("data,field,words", [
    ({"partition": "kahip"}, "gnn_plan.partition", "'metis', 'random' or 'metis-balanced'"),
    ({"feature_cache_fraction": 1.5}, "gnn_plan.feature_cache_fraction", "less than or equal to 1"),
    ({"feature_placement": "replicated", "feature_cache_fraction": 0.2}, "gnn_plan.feature_cache_fraction",
     "nothing remote"),
    ({"trainers_per_machine": 0}, "gnn_plan.trainers_per_machine", "greater than or equal to 1"),
    ({"feature_dtype": "int8"}, "gnn_plan.feature_dtype", "'fp32', 'bf16' or 'fp16'"),
])
def test_bad_plan_fields_are_named(data, field, words):
    msg = error_of(GNNPlan.parse, data)
    assert msg.startswith(field) and words in msg, msg


def test_graph_files_are_relative_to_the_spec_file(tmp_path):
    (tmp_path / "g.yaml").write_text("name: tiny\nfiles: {format: csv, edges: edges.csv}\n")
    spec = load_graph(str(tmp_path / "g.yaml"))
    assert spec.files.edges == str(tmp_path / "edges.csv")
    assert not spec.generated
