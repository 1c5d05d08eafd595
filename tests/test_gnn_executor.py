"""The GNN executor: a neighbor sampler that keeps to the fan-outs and to the graph's edges, remote
features fetched exactly from their owners, 1-rank and 2-rank training that learn the same
labels, refusals that name the field, and `simtune run gnn --json`.

The graph is a small generated community graph (6,000 nodes, 4 classes, features around a
per-class mean) and the model a 2-layer GraphSAGE of width 32, so that a run of 6 epochs
takes seconds; 1 rank at 300 seeds per batch and 2 ranks at 150 each see the same global batch.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from executor.gnn.exchange import Exchange
from executor.gnn.features import FeatureStore
from executor.gnn.run import run_gnn
from executor.gnn.sampler import DistSampler, sample_neighbors
from profiler.ranks import run_ranks
from simtune.cli import app
from simulator.errors import SpecError
from simulator.gnn.graph import build_graph
from simulator.gnn.partition import partition_graph
from simulator.gnn.store import load_partition, write_partition

GRAPH = {"name": "community-6k", "num_nodes": 6000, "num_edges": 90000, "feature_dim": 16, "num_classes": 4,
         "num_communities": 4, "intra_community_fraction": 0.8, "train_fraction": 0.5,
         "val_fraction": 0.1, "test_fraction": 0.2, "seed": 0}
MODEL = {"name": "sage-2x32", "architecture": "graphsage", "num_layers": 2, "hidden_size": 32, "fanouts": [10, 5]}
EPOCHS = 6
ACCURACY_TOLERANCE = 0.03  # |test accuracy of 2 ranks - of 1 rank| after EPOCHS epochs


@pytest.fixture(scope="module")
def graph():
    return build_graph(GRAPH)


@pytest.fixture(scope="module")
def two_parts(graph, tmp_path_factory):
    out = tmp_path_factory.mktemp("gnn") / "parts2"
    write_partition(out, graph, partition_graph(graph, 2, "metis"))
    return out


def edge_keys(graph) -> np.ndarray:
    """dst * N + src of every stored edge, sorted (to look edges up)."""
    return np.sort(graph.destinations().astype(np.int64) * graph.num_nodes + graph.indices)


def check_blocks(graph, blocks, fanouts) -> None:
    """Every sampled edge is a real in-edge of its dst, and each dst has min(degree, fanout) of them."""
    keys, degrees = edge_keys(graph), graph.in_degrees
    for block, fanout in zip(blocks[::-1], fanouts):  # blocks run input side first, fan-outs seed side first
        dst_ids = block.src_nodes[:block.num_dst]
        src, dst = block.src_nodes[np.asarray(block.src)], dst_ids[np.asarray(block.dst)]
        wanted = dst * graph.num_nodes + src
        found = keys[np.minimum(np.searchsorted(keys, wanted), keys.size - 1)]
        assert (found == wanted).all(), "a sampled neighbor is not an in-neighbor"
        counts = np.bincount(np.asarray(block.dst), minlength=block.num_dst)
        assert counts.max() <= fanout
        np.testing.assert_array_equal(counts, np.minimum(degrees[dst_ids], fanout))


def test_one_hop_keeps_fanout_and_draws_without_replacement(graph):
    rng = np.random.default_rng(0)
    rows = np.arange(graph.num_nodes)
    counts, nbrs = sample_neighbors(graph.indptr, graph.indices, rows, 5, rng)
    np.testing.assert_array_equal(counts, np.minimum(graph.in_degrees, 5))
    starts = np.cumsum(counts) - counts
    for v in rng.choice(graph.num_nodes, 300, replace=False):
        drawn = nbrs[starts[v]:starts[v] + counts[v]]
        true = graph.indices[graph.indptr[v]:graph.indptr[v + 1]]
        assert np.isin(drawn, true).all()
        if true.size <= 5:  # small rows keep every edge
            np.testing.assert_array_equal(np.sort(drawn), np.sort(true))
        # without replacement: no neighbor drawn more often than it is stored
        values, times = np.unique(drawn, return_counts=True)
        assert (times <= np.array([(true == x).sum() for x in values])).all()


def test_sampler_fanouts_are_respected_on_one_rank(graph):
    fanouts = [10, 5, 3]
    sampler = DistSampler(graph.indptr, graph.indices, np.arange(graph.num_nodes), np.zeros(graph.num_nodes, np.int32),
                          fanouts, Exchange(0, 1), seed=1)
    batch = sampler.sample(np.random.default_rng(0).choice(graph.num_nodes, 200, replace=False))
    assert len(batch.blocks) == 3
    check_blocks(graph, batch.blocks, fanouts)
    np.testing.assert_array_equal(batch.input_nodes, batch.blocks[0].src_nodes)
    for inner, outer in zip(batch.blocks[1:], batch.blocks[:-1]):  # a block's src nodes feed the next layer
        np.testing.assert_array_equal(outer.src_nodes[:outer.num_dst], inner.src_nodes)


def _sample_and_fetch(rank: int, world_size: int, directory: str, fanouts: list[int]) -> dict:
    part = load_partition(directory, rank)
    exchange = Exchange(rank, world_size)
    sampler = DistSampler(part.indptr, part.indices, part.owned, part.node_map, fanouts, exchange, seed=rank)
    store = FeatureStore(part.features, part.owned, part.node_map, exchange)
    batch = sampler.sample(part.owned[part.train_mask][:100])
    rows = store.fetch(batch.input_nodes, timings := {})
    remote = int((part.node_map[batch.input_nodes] != rank).sum())
    # numpy, not tensors: a tensor would travel to the parent as a shared-memory handle of a process that has ended
    blocks = [SimpleNamespace(num_dst=b.num_dst, src=b.src.numpy(), dst=b.dst.numpy(), src_nodes=b.src_nodes)
              for b in batch.blocks]
    return {"blocks": blocks, "input_nodes": batch.input_nodes, "rows": rows.numpy(),
            "remote": remote, "remote_rows": store.remote_rows, "timings": timings}


def test_two_ranks_sample_true_neighbors_and_fetch_the_owners_rows(graph, two_parts):
    fanouts = [10, 5]
    results = run_ranks(_sample_and_fetch, 2, args=(str(two_parts), fanouts), timeout_s=120)
    for r in results:
        check_blocks(graph, r["blocks"], fanouts)
        np.testing.assert_array_equal(r["rows"], graph.features[r["input_nodes"]])
        assert r["remote"] > 0 and r["remote_rows"] == r["remote"]
        assert r["timings"]["fetch_remote"] > 0


@pytest.fixture(scope="module")
def one_rank():
    return run_gnn(GRAPH, MODEL, {"partition": "metis", "batch_size_per_trainer": 300}, 1, epochs=EPOCHS)


@pytest.fixture(scope="module")
def two_ranks_cli(two_parts, tmp_path_factory):
    """`simtune run gnn --json` on 2 ranks, specs from YAML files, the partition from a store."""
    d = tmp_path_factory.mktemp("specs")
    paths = {}
    for name, spec in (("graph", GRAPH), ("model", MODEL),
                       ("plan", {"partition": "metis", "batch_size_per_trainer": 150,
                                 "samplers_per_trainer": 1, "pipeline_fetch": True,
                                 "feature_cache_fraction": 0.1})):
        paths[name] = d / f"{name}.yaml"
        paths[name].write_text(yaml.safe_dump(spec))
    result = CliRunner().invoke(app, ["run", "gnn", "--graph", str(paths["graph"]), "--model", str(paths["model"]),
                                      "--plan", str(paths["plan"]), "--nproc", "2", "--epochs", str(EPOCHS),
                                      "--partition-dir", str(two_parts), "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_single_partition_fetches_nothing_remote(one_rank):
    assert one_rank.remote_bytes_per_epoch == 0 and one_rank.sampling_bytes_per_epoch == 0
    assert one_rank.breakdown["allreduce"] < 0.01
    assert one_rank.ranks[0]["halo_nodes"] == 0


def test_two_ranks_reach_one_ranks_accuracy(one_rank, two_ranks_cli):
    one, two = one_rank.test_accuracy[-1], two_ranks_cli["test_accuracy"][-1]
    assert one > 0.8 and two > 0.8, "features and neighbors predict the labels; both must learn them"
    assert abs(two - one) <= ACCURACY_TOLERANCE, (one, two)
    assert one_rank.losses[-1] < one_rank.losses[0] and two_ranks_cli["losses"][-1] < two_ranks_cli["losses"][0]


def test_run_gnn_json_contract(two_ranks_cli):
    r = two_ranks_cli
    for key in ("epoch_time_s", "iteration_time_s", "iterations_per_epoch", "breakdown", "remote_bytes_per_epoch",
                "val_accuracy", "test_accuracy", "epoch_times_s", "partition", "ranks"):
        assert key in r, key
    assert set(r["breakdown"]) == {"sample", "fetch_local", "fetch_remote", "compute", "allreduce", "stall"}
    assert r["nproc"] == 2 and len(r["ranks"]) == 2 and len(r["test_accuracy"]) == EPOCHS
    assert r["remote_bytes_per_epoch"] > 0 and r["breakdown"]["fetch_remote"] > 0
    assert all(rank["cached_nodes"] > 0 for rank in r["ranks"])  # the plan caches 10% of the halo
    assert r["iteration_time_s"] == pytest.approx(r["epoch_time_s"] / r["iterations_per_epoch"])
    assert r["partition"]["method"] == "metis" and r["cluster"] == "2xcpu"


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"nproc": 3}, "nproc"),                                    # the store has 2 parts
    ({"nproc": 0}, "nproc"),
    ({"epochs": 0}, "epochs"),
    ({"model": {**MODEL, "embedding_dim": 8}}, "embedding_dim"),
    ({"model": {**MODEL, "aggregator": "pool"}}, "aggregator"),
    ({"graph": {**GRAPH, "name": "another-graph"}}, "partition"),  # the store holds community-6k
])
def test_bad_inputs_are_refused_by_field(two_parts, kwargs, field):
    args = {"graph": GRAPH, "model": MODEL, "plan": {"partition": "metis"}, "nproc": 2, **kwargs}
    with pytest.raises(SpecError) as e:
        run_gnn(args.pop("graph"), args.pop("model"), args.pop("plan"), args.pop("nproc"),
                partition_dir=two_parts, **args)
    assert e.value.field == field


def test_graph_without_features_is_refused(tmp_path):
    bare = {**GRAPH, "name": "bare", "feature_dim": 0}
    with pytest.raises(SpecError, match="no node features"):
        run_gnn(bare, MODEL, {"partition": "random"}, 1)


def test_cli_refuses_a_part_count_mismatch(two_parts):
    result = CliRunner().invoke(app, ["run", "gnn", "--graph", "community-20k", "--model", "graphsage-3",
                                      "--plan", "distdgl-default", "--nproc", "1", "--partition-dir", str(two_parts)])
    assert result.exit_code == 2
    assert "nproc" in result.stderr
