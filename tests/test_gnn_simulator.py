"""GNN epoch simulator: sampling saturation, partition effects, scaling, the pipeline, errors, CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from simtune.cli import app
from simulator.errors import SpecError
from simulator.gnn import costs, quality
from simulator.gnn.graph import build_graph
from simulator.gnn.partition import partition_graph
from simulator.gnn.report import BREAKDOWN_KEYS
from simulator.gnn.sampling import expected_counts, sample_counts
from simulator.gnn.simulate import _breakdown, simulate_gnn
from simulator.specs.catalog import load_cluster, load_gnn_plan, load_graph
from simulator.specs.gnn import GNNPlan

FANOUTS = [15, 10, 5]


@pytest.fixture(scope="module")
def graph():
    return build_graph("community-20k")


@pytest.fixture
def small_stand_in(monkeypatch):
    """Statistical-path tests partition a 6,000-node stand-in instead of 40,000."""
    monkeypatch.setattr(quality, "SAMPLE_NODES", 6_000)


def test_sampling_saturates_monotonically_and_never_exceeds_the_graph():
    spec = load_graph("community-20k")
    previous = None
    for batch in (10, 100, 1000, 5000, 10000):
        nodes, edges, _ = expected_counts(spec, FANOUTS, batch)
        assert all(b >= a for a, b in zip(nodes, nodes[1:]))          # hops only add nodes
        assert max(nodes) <= spec.num_nodes
        if previous is not None:
            assert all(n >= p for n, p in zip(nodes, previous))
        previous = nodes
    assert previous[-1] > 0.9 * spec.num_nodes                        # a huge batch covers the graph
    small, small_edges, _ = expected_counts(spec, FANOUTS, 10)
    assert small[1] == pytest.approx(10 + small_edges[0], rel=0.06)  # 10 seeds: few repeats (hubs only)


def test_expected_counts_agree_with_sampling_the_generated_graph(graph):
    nodes, edges, candidates = expected_counts(load_graph("community-20k"), FANOUTS, 2000)
    measured, _ = sample_counts(graph, np.zeros(graph.num_nodes, dtype=np.int32), 0, 1, FANOUTS, 2000)
    assert np.allclose(nodes, measured.nodes, rtol=0.2)
    assert np.allclose(edges, measured.edges, rtol=0.2)
    assert np.allclose(candidates, measured.candidates, rtol=0.2)   # the degree-biased frontiers
    assert measured.candidates[1] > 3 * measured.edges[1]              # a power law: hubs shuffle many


def test_sampler_respects_fanouts(graph):
    counts, _ = sample_counts(graph, np.zeros(graph.num_nodes, dtype=np.int32), 0, 1, FANOUTS, 100)
    for h, f in enumerate(FANOUTS):
        assert counts.edges[h] <= counts.nodes[h] * f


def test_a_single_partition_fetches_nothing_remotely():
    report = simulate_gnn("community-20k", "graphsage-3", "1xm5n-24xlarge", "distdgl-default")
    assert report.remote_bytes_per_epoch == 0
    assert report.breakdown["fetch_remote"] == 0
    assert report.trainer_loads[0].remote_input_fraction == 0


def test_metis_moves_fewer_bytes_and_is_faster_than_random_on_a_community_graph():
    plan = {"batch_size_per_trainer": 100}
    metis = simulate_gnn("community-20k", "graphsage-3", "4xm5n-24xlarge", {**plan, "partition": "metis"})
    random = simulate_gnn("community-20k", "graphsage-3", "4xm5n-24xlarge", {**plan, "partition": "random"})
    assert metis.remote_bytes_per_epoch < 0.8 * random.remote_bytes_per_epoch
    assert metis.epoch_time_s < random.epoch_time_s


def test_more_machines_with_a_fixed_per_trainer_batch_scale_near_linearly(small_stand_in):
    four = simulate_gnn("ogbn-papers100m", "graphsage-3", "4xm5n-24xlarge", "distdgl-default")
    sixteen = simulate_gnn("ogbn-papers100m", "graphsage-3", "16xm5n-24xlarge", "distdgl-default")
    assert four.path == sixteen.path == "statistical"
    assert four.iterations_per_epoch == pytest.approx(4 * sixteen.iterations_per_epoch, rel=0.1)
    assert 3.0 <= four.epoch_time_s / sixteen.epoch_time_s <= 4.4


def test_breakdown_sums_to_the_iteration_and_epoch_is_iterations_times_it(graph):
    report = simulate_gnn(graph, "gat-3", "2xg5-24xlarge", {"trainers_per_machine": 4})
    assert set(BREAKDOWN_KEYS) <= set(report.breakdown)
    assert sum(report.breakdown.values()) == pytest.approx(report.iteration_time_s)
    assert report.epoch_time_s == pytest.approx(report.iterations_per_epoch * report.iteration_time_s)
    assert report.breakdown["h2d_copy"] > 0                        # GPU machines copy the batch


def test_pipeline_rules_as_a_timeline():
    stages = {"sample": 0.8, "fetch_local": 0.05, "fetch_remote": 0.15, "compute": 0.2, "h2d_copy": 0.0,
              "allreduce": 0.0, "sparse_update": 0.0}
    inline = _breakdown(stages, GNNPlan(samplers_per_trainer=0))
    assert sum(inline.values()) == pytest.approx(1.2)                # sample, then fetch, then compute
    two = _breakdown(stages, GNNPlan(samplers_per_trainer=2))        # 0.4 s per batch from the samplers
    assert two["stall"] == pytest.approx(0.4 - 0.4) and sum(two.values()) == pytest.approx(0.4)
    one = _breakdown(stages, GNNPlan(samplers_per_trainer=1))
    assert one["stall"] == pytest.approx(0.4) and sum(one.values()) == pytest.approx(0.8)
    piped = _breakdown({**stages, "sample": 0.1}, GNNPlan(samplers_per_trainer=1, pipeline_fetch=True))
    assert sum(piped.values()) == pytest.approx(0.2)                 # fetch 0.2 hides behind compute 0.2


def test_cache_and_replication_cut_remote_bytes(graph):
    base = {"batch_size_per_trainer": 200}
    none = simulate_gnn(graph, "graphsage-3", "4xm5n-24xlarge", base)
    cached = simulate_gnn(graph, "graphsage-3", "4xm5n-24xlarge", {**base, "feature_cache_fraction": 0.3})
    replicated = simulate_gnn(graph, "graphsage-3", "4xm5n-24xlarge", {**base, "feature_placement": "replicated"})
    assert cached.remote_bytes_per_epoch < none.remote_bytes_per_epoch
    assert replicated.breakdown["fetch_remote"] == 0


def test_learnable_embeddings_add_a_sparse_update(graph):
    model = {"architecture": "graphsage", "num_layers": 3, "hidden_size": 64, "fanouts": FANOUTS, "embedding_dim": 16}
    report = simulate_gnn(graph, model, "2xm5n-24xlarge", "distdgl-default")
    assert report.breakdown["sparse_update"] > 0


def test_bad_inputs_name_field_value_and_what_is_allowed(graph):
    part = partition_graph(graph, 2, "random")
    with pytest.raises(SpecError) as e:
        simulate_gnn(graph, "graphsage-3", "4xm5n-24xlarge", "distdgl-default", partition=part)
    assert e.value.field == "partition.num_parts" and e.value.value == 2 and "4" in e.value.allowed
    with pytest.raises(SpecError, match="graph"):
        simulate_gnn("no-such-graph", "graphsage-3", "4xm5n-24xlarge", "distdgl-default")
    with pytest.raises(SpecError, match="partition"):
        load_gnn_plan({"partition": "spectral"})
    tiny = {"name": "tiny", "num_nodes": 3, "num_edges": 4, "train_fraction": 0.5}
    with pytest.raises(SpecError) as e:
        simulate_gnn(tiny, "graphsage-3", "4xm5n-24xlarge", "distdgl-default")
    assert e.value.value == 4 and "3" in e.value.allowed


def test_a_given_partition_is_used(graph):
    part = partition_graph(graph, 2, "random")
    report = simulate_gnn(graph, "graphsage-3", "2xm5n-24xlarge", {"partition": "metis"}, partition=part)
    assert report.partition["method"] == "random"


# --- CLI ----------------------------------------------------------------------------------------


def _json(*args: str) -> dict:
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert isinstance(data, dict)
    return data


def test_simulate_gnn_json_contract(tmp_path):
    trace = tmp_path / "gnn.json"
    data = _json("simulate", "gnn", "--graph", "community-20k", "--model", "graphsage-3", "--cluster",
                 "2xm5n-24xlarge", "--plan", "distdgl-default", "--json", "--trace", str(trace))
    for key in ("epoch_time_s", "iteration_time_s", "iterations_per_epoch", "breakdown", "remote_bytes_per_epoch",
                "per_trainer_load"):
        assert key in data
    assert {"sample", "fetch_local", "fetch_remote", "compute", "allreduce", "stall"} <= set(data["breakdown"])
    assert len(data["per_trainer_load"]) == 2
    events = json.loads(trace.read_text())["traceEvents"]
    assert any(e.get("name") == "compute" for e in events)


def test_simulate_gnn_bad_plan_exits_2_naming_the_field():
    result = CliRunner().invoke(app, ["simulate", "gnn", "--graph", "community-20k", "--model", "graphsage-3",
                                      "--cluster", "2xm5n-24xlarge", "--plan", "no-such-plan", "--json"])
    assert result.exit_code == 2 and "gnn_plan" in result.stderr and result.stdout == ""


def test_validate_gnn_json_has_every_published_check(small_stand_in):
    data = _json("validate", "gnn", "--json")
    ids = {r["id"] for r in data["rows"]}
    assert {"papers100m-16", "papers100m-scaling", "products-metis", "papers100m-metis", "papers100m-balanced"} <= ids
    assert all(r["source"] and "predicted" in r for r in data["rows"])


def test_concentrated_training_set_lives_in_the_chosen_communities_and_unbalances_plain_metis():
    spec = load_graph("community-20k").model_copy(update={"train_fraction": 0.05, "val_fraction": 0.0,
                                                          "test_fraction": 0.0, "train_community_fraction": 0.25})
    g = build_graph(spec)
    held = np.unique(g.communities[g.train_nodes])
    assert held.size == 2 and g.train_nodes.size == 1000          # 2 of 8 communities hold every training node
    spread = build_graph(spec.model_copy(update={"train_community_fraction": 1.0}))
    assert np.unique(spread.communities[spread.train_nodes]).size == 8
    plain = partition_graph(g, 4, "metis").balance["train_nodes"]
    balanced = partition_graph(g, 4, "metis-balanced").balance["train_nodes"]
    assert plain > 1.3 and balanced <= 1.05 + 1e-9


def test_default_training_split_is_unchanged_by_the_new_field():
    a = build_graph(load_graph("community-20k"))
    b = build_graph(load_graph("community-20k").model_copy(update={"train_community_fraction": 1.0}))
    assert np.array_equal(a.train_mask, b.train_mask)


def test_processes_share_the_machines_cores():
    m5n = load_cluster("4xm5n-24xlarge")
    # launch.py: OMP threads = 96 // 2 // trainers; two hyperthreads are one core's FMA units
    assert costs.trainer_threads(m5n, 2) == 24 and costs.trainer_cores(m5n, 2) == 12
    assert costs.oversubscription(m5n, GNNPlan(trainers_per_machine=2, samplers_per_trainer=4)) == 1.0  # 33 of 48
    crowded = GNNPlan(trainers_per_machine=8, samplers_per_trainer=8)              # 24 + 64 + 1 cores wanted
    assert costs.oversubscription(m5n, crowded) == pytest.approx(89 / 48)
    assert costs.oversubscription(load_cluster("4xcpu"), crowded) == 1.0            # no cores described


def test_samplers_cost_cores_so_more_is_not_always_faster(graph):
    plans = [GNNPlan(trainers_per_machine=8, samplers_per_trainer=s, batch_size_per_trainer=500) for s in (2, 8)]
    few, many = (simulate_gnn(graph, "graphsage-3", "2xg5-8xlarge", p) for p in plans)
    assert many.trainer_loads[0].stages_s["fetch_remote"] > few.trainer_loads[0].stages_s["fetch_remote"]


def test_server_serves_remote_samples_and_pulls_and_metis_lightens_it(graph):
    plan = load_gnn_plan("distdgl-default").model_copy(update={"batch_size_per_trainer": 500})
    serve = {m: simulate_gnn(graph, "graphsage-3", "4xm5n-24xlarge", plan.model_copy(update={"partition": m}))
             .trainer_loads[0].stages_s["serve"] for m in ("metis", "random")}
    assert 0 < serve["metis"] < 0.7 * serve["random"]
    one = simulate_gnn(graph, "graphsage-3", "m5n-24xlarge", plan)
    assert one.trainer_loads[0].stages_s["serve"] == 0                              # nothing is remote
    assert simulate_gnn(graph, "graphsage-3", "2xcpu", plan).trainer_loads[0].stages_s["serve"] == 0


def test_servers_are_loaded_by_what_the_others_direct_at_them():
    """Balanced parts load every server alike with what the others ask in total; a part short of
    training nodes takes foreign seeds from the heavy part, whose server then carries them."""
    from simulator.gnn.quality import PartitionQuality
    from simulator.gnn.sampling import HopCounts
    from simulator.gnn.simulate import asked_demand, served_demand

    plan = GNNPlan(trainers_per_machine=2)
    hop = HopCounts([100.0, 600.0, 2000.0, 4000.0], [1500.0, 6000.0, 10000.0], 3000.0, 0.0, 1000.0,
                    [0.0, 150.0, 500.0])

    def quality(train_share):
        return PartitionQuality("metis", 3, 0.25, [0.25] * 3, 0.1, train_share, [1 / 3] * 3, [1 / 3] * 3, {}, [0.0],
                                "test")

    even = served_demand([(hop, 1.0)] * 3, quality([1 / 3] * 3), plan)
    asked = asked_demand(hop, plan)
    for s in even:  # each server gets half of each of the two others' trainers' asks
        assert s.rows == pytest.approx(2 * asked.rows) and s.edges == pytest.approx(2 * asked.edges)
        assert s.requests == 2 * 2 * 4                   # two machines x two trainers x (3 hops + the pull)
    foreign = HopCounts(hop.nodes, hop.edges, 2000.0, 0.0, 2000.0, [40.0, 300.0, 900.0])
    skewed = served_demand([(hop, 1.0), (foreign, 0.4), (hop, 1.0)], quality([0.5, 0.2, 0.3]), plan)
    assert skewed[0].rows > 1.5 * skewed[2].rows     # part 0 owns the excess: the short part's hot spot
    total = sum(s.rows for s in skewed)               # nothing is lost or invented by the direction
    assert total == pytest.approx(2 * (2 * asked.rows + asked_demand(foreign, plan).rows))
    assert costs.serve_s(skewed[0], 400.0, 3, load_cluster("3xm5n-24xlarge")) > costs.serve_s(
        skewed[2], 400.0, 3, load_cluster("3xm5n-24xlarge"))


def test_a_slow_server_shows_as_serve_in_the_breakdown():
    stages = dict.fromkeys(("sample", "fetch_local", "fetch_remote", "h2d_copy", "allreduce", "sparse_update"), 0.0)
    stages.update(compute=0.3, serve=0.5)
    b = _breakdown(stages, GNNPlan(samplers_per_trainer=2))
    assert b["serve"] == pytest.approx(0.2) and sum(b.values()) == pytest.approx(0.5)
    assert _breakdown({**stages, "serve": 0.1}, GNNPlan(samplers_per_trainer=2))["serve"] == 0


def test_cpu_ranks_are_priced_from_the_profiles_measured_gnn_operations(graph):
    plan = GNNPlan(batch_size_per_trainer=1000)
    profiled, datasheet = load_cluster("1xcpu"), load_cluster("1xcpu", profile="none")
    fits = costs.measured_ops(profiled)
    assert fits is not None and "gnn" in profiled.device.cost_sources
    assert costs.measured_ops(datasheet) is None
    assert costs.measured_ops(load_cluster("4xm5n-24xlarge")) is None   # no profile: physics as before
    report = simulate_gnn(graph, "graphsage-3", profiled, plan)
    counts, stages = report.trainer_loads[0], report.trainer_loads[0].stages_s
    nodes, edges = report.sampled_nodes_per_layer, report.sampled_edges_per_layer
    from simulator.specs.catalog import load_gnn_model
    model = load_gnn_model("graphsage-3")
    assert stages["compute"] == pytest.approx(costs.measured_compute_s(fits, model, graph.feature_dim,
                                                                       graph.num_classes, nodes, edges))
    candidates = report.candidate_edges_per_layer
    assert stages["sample"] == pytest.approx(costs.measured_sample_s(fits, nodes, edges, candidates))
    assert counts.input_nodes == nodes[-1]
    fallback = simulate_gnn(graph, "graphsage-3", datasheet, plan).trainer_loads[0].stages_s
    layers = costs.layer_costs(model, graph.feature_dim, graph.num_classes, nodes, edges)
    assert fallback["compute"] == pytest.approx(costs.compute_s(datasheet, layers, 1.0))
    # GAT layers are not in the family: they keep the FLOP-based model even with the profile
    gat = simulate_gnn(graph, "gat-3", profiled, plan).trainer_loads[0].stages_s
    assert gat["compute"] > 0


def test_measured_operation_costs_add_up_term_by_term():
    fits = {op: dict.fromkeys(terms, 0.0) for op, terms in costs.OP_TERMS.items()}
    fits["aggregate"]["s_per_edge"] = 1e-7
    fits["aggregate_input"]["s_per_edge"] = 2e-7
    fits["optimizer"]["overhead_s"] = 1e-3
    fits["relu_dropout"]["s_per_element"] = 1e-8
    from simulator.specs.catalog import load_gnn_model
    model = load_gnn_model("graphsage-3")
    nodes, edges = [1000.0, 5000.0, 12000.0, 16000.0], [15000.0, 50000.0, 60000.0]
    # input layer aggregates the outermost hop's 60,000 edges; two hidden layers of 256 get dropout
    expected = 1e-3 + 2e-7 * 60000 + 1e-7 * (50000 + 15000) + 1e-8 * 256 * (12000 + 5000)
    assert costs.measured_compute_s(fits, model, 32, 8, nodes, edges) == pytest.approx(expected)
    # GAT (4 heads): each layer projects its source rows, then attends over edges + self loops;
    # the hidden layers' heads are 64 wide, the output layer's 8 (the classes, averaged)
    fits["gat_attention"]["s_per_edge_head"] = 1e-8
    fits["linear"]["overhead_s"] = fits["linear_input"]["overhead_s"] = 1e-4
    gat = load_gnn_model("gat-3")
    expected_gat = 1e-3 + 3 * 1e-4 + 1e-8 * 4 * sum(e + d for e, d in zip(edges, nodes)) + 1e-8 * 256 * (12000 + 5000)
    assert costs.measured_compute_s(fits, gat, 32, 8, nodes, edges) == pytest.approx(expected_gat)
    with pytest.raises(ValueError, match="unknown gnn op"):
        costs.op_terms("spmm")


def test_executor_request_rounds_cost_four_measured_all_to_alls():
    """Without DistDGL's servers a request round is the executor's four all-to-all calls, at the
    profile's measured latency for that many ranks; a datasheet cluster uses its link latency."""
    from simulator.costs.comm import Link
    from simulator.specs.profile import load_profile

    cpu = load_cluster("2xcpu")
    alpha = load_profile(cpu.profile).fit("collectives")["gloo"]["all_to_all"]["2"]["alpha_s"]
    assert costs.exchange_round_s(cpu, 2) == pytest.approx(4 * alpha)
    gpu = load_cluster("4xa100-80gb")
    assert costs.exchange_round_s(gpu, 4) == pytest.approx(4 * Link.of(gpu, "inter_node", 4).alpha_s)
