"""Specs: bad inputs give a SpecError naming field, value and rule; the catalog loads and
round-trips."""

from __future__ import annotations

import pytest
import yaml

from simulator.errors import SpecError
from simulator.specs import (
    ClusterSpec,
    DeploymentSpec,
    DeviceSpec,
    EngineSpec,
    TrainingPlan,
    TransformerSpec,
    WorkloadSpec,
    catalog_names,
    load_cluster,
    load_deployment,
    load_device,
    load_engine,
    load_model,
    load_plan,
    load_workload,
)
from simulator.specs.catalog import CATALOG_DIR, load_gnn_model, load_gnn_plan, load_graph
from simulator.specs.gnn import GNNModelSpec, GNNPlan
from simulator.specs.graph import GraphSpec
from simulator.specs.plan import validate_plan
from simulator.training import simulate_training


def error_of(fn, *args) -> str:
    with pytest.raises(SpecError) as info:
        fn(*args)
    return str(info.value)


def check(model: str, cluster: str, plan: dict) -> None:
    validate_plan(load_plan(plan), load_model(model), load_cluster(cluster))


# --- bad inputs ---------------------------------------------------------------------------------

def test_unknown_model_lists_the_catalog():
    msg = error_of(load_model, "gpt-5")
    assert "model" in msg and "'gpt-5'" in msg
    for name in ("gpt-debug", "llama-3-8b", "gpt3-175b"):
        assert name in msg
    assert "llama-3-8b" in error_of(simulate_training, "gpt-5", "8xh100", "debug")


def test_unknown_cluster_and_device_list_the_catalog():
    msg = error_of(load_cluster, "3xb200")
    assert "cluster" in msg and "'3xb200'" in msg and "8xh100" in msg
    assert "h100-sxm" in error_of(load_device, "b200")


def test_missing_yaml_file_is_named():
    msg = error_of(load_model, "no/such/model.yaml")
    assert "no/such/model.yaml" in msg and "does not exist" in msg


def test_tp_must_divide_the_heads():
    msg = error_of(check, "gpt-debug", "8xa100-80gb", {"tp": 8, "global_batch_size": 8})
    assert msg.startswith("plan.tp = 8")
    assert "num_attention_heads = 4" in msg


def test_tp_must_fit_the_kv_heads():
    # llama-debug: 4 heads, 2 KV heads; tp = 4 divides the heads and is a multiple of 2.
    check("llama-debug", "4xl4", {"tp": 4, "global_batch_size": 4})
    odd_kv = {**load_model("llama-debug").to_dict(), "name": "odd-kv", "hidden_size": 96,
              "num_attention_heads": 12, "num_kv_heads": 3, "ffn_hidden_size": 256}
    plan = load_plan({"tp": 2, "global_batch_size": 4})
    msg = error_of(validate_plan, plan, load_model(odd_kv), load_cluster("2xa100-80gb"))
    assert msg.startswith("plan.tp = 2") and "num_kv_heads = 3" in msg


def test_pp_must_not_exceed_layers():
    msg = error_of(check, "gpt-debug", "8xa100-80gb", {"pp": 8, "global_batch_size": 8})
    assert msg.startswith("plan.pp = 8")
    assert "num_layers = 4" in msg


def test_degrees_must_fill_the_cluster():
    msg = error_of(check, "gpt-debug", "8xa100-80gb", {"tp": 2, "dp": 2, "global_batch_size": 8})
    assert "plan" in msg and "tp=2 pp=1 dp=2" in msg
    assert "tp x pp x dp = 4" in msg and "8 devices" in msg and "8xa100-80gb" in msg


def test_global_batch_must_divide_into_microbatches():
    msg = error_of(load_plan, {"dp": 2, "micro_batch_size": 3, "global_batch_size": 8})
    assert msg.startswith("plan.global_batch_size = 8:")
    assert "micro_batch_size x dp = 3 x 2 = 6" in msg


def test_interleaved_needs_virtual_stages():
    msg = error_of(load_plan, {"pp": 2, "global_batch_size": 8, "schedule": "interleaved"})
    assert msg.startswith("plan.virtual_stages = 1:") and "must be >= 2" in msg and "interleaved" in msg
    msg = error_of(load_plan, {"pp": 2, "global_batch_size": 8, "virtual_stages": 2})
    assert "virtual_stages" in msg and "'1f1b'" in msg


def test_interleaved_needs_microbatches_divisible_by_pp():
    plan = {"pp": 4, "dp": 2, "global_batch_size": 12, "schedule": "interleaved", "virtual_stages": 2}
    msg = error_of(check, "gpt3-1.3b", "8xa100-80gb", plan)
    assert msg.startswith("plan.global_batch_size = 12") and "pp = 4" in msg


def test_unknown_plan_field_lists_known_fields():
    msg = error_of(load_plan, {"global_batch_size": 8, "tensor_parallel": 2})
    assert msg.startswith("plan.tensor_parallel = 2")
    assert "unknown field" in msg
    for field in ("tp", "pp", "dp", "micro_batch_size", "zero_stage", "recompute"):
        assert field in msg


def test_negative_num_layers():
    data = {**load_model("gpt-debug").to_dict(), "num_layers": -3}
    msg = error_of(load_model, data)
    assert msg.startswith("model.num_layers = -3")
    assert "1" in msg.split(":", 1)[1]  # the bound


def test_offload_fraction_above_one():
    msg = error_of(load_plan, {"global_batch_size": 8, "offload": {"weights": 1.5}})
    assert msg.startswith("plan.offload.weights = 1.5")
    assert "less than or equal to 1" in msg


def test_bad_literal_names_allowed_values():
    msg = error_of(load_plan, {"global_batch_size": 8, "recompute": "some"})
    assert msg.startswith("plan.recompute = 'some'")
    assert "'selective'" in msg and "'full'" in msg


def test_stage_layers_must_sum_to_num_layers():
    plan = {"pp": 2, "dp": 4, "global_batch_size": 8, "stages": [{"layers": 1}, {"layers": 1}]}
    msg = error_of(check, "gpt-debug", "8xa100-80gb", plan)
    assert msg.startswith("plan.stages = [1, 1]")
    assert "num_layers = 4" in msg
    # The same plan with layers summing to 4 is fine.
    check("gpt-debug", "8xa100-80gb", {**plan, "stages": [{"layers": 3}, {"layers": 1}]})


def test_stage_count_must_match_pp():
    msg = error_of(load_plan, {"pp": 2, "global_batch_size": 8, "stages": [{"layers": 4}]})
    assert msg.startswith("plan.stages = [{'layers': 4}]:") and "pp = 2" in msg and "not 1" in msg


def test_checkpointed_layers_cannot_exceed_stage_layers():
    msg = error_of(load_plan, {"pp": 1, "global_batch_size": 8,
                               "stages": [{"layers": 2, "checkpointed_layers": 3}]})
    assert msg.startswith("plan.stages.0.checkpointed_layers = 3:") and "layers = 2" in msg


def test_model_heads_must_divide_hidden():
    data = {**load_model("gpt-debug").to_dict(), "num_attention_heads": 5}
    msg = error_of(load_model, data)
    assert msg.startswith("model.hidden_size = 64:") and "num_attention_heads = 5" in msg


def test_non_mapping_is_rejected():
    assert "must be a catalog name" in error_of(load_plan, 42)


# --- catalog ------------------------------------------------------------------------------------

LOADERS = {"models": load_model, "devices": load_device, "clusters": load_cluster, "plans": load_plan,
           "deployments": load_deployment, "workloads": load_workload, "engines": load_engine,
           "graphs": load_graph, "gnn_models": load_gnn_model, "gnn_plans": load_gnn_plan}
CLASSES = {"models": TransformerSpec, "devices": DeviceSpec, "clusters": ClusterSpec, "plans": TrainingPlan,
           "deployments": DeploymentSpec, "workloads": WorkloadSpec, "engines": EngineSpec,
           "graphs": GraphSpec, "gnn_models": GNNModelSpec, "gnn_plans": GNNPlan}
ENTRIES = [(kind, name) for kind, names in catalog_names().items() for name in names]


def test_catalog_is_not_empty():
    names = catalog_names()
    assert {"gpt-debug", "llama-debug", "gpt3-175b", "llama-3-70b"} <= set(names["models"])
    assert {"8xa100-80gb", "8xh100", "2xa100-80gb"} <= set(names["clusters"])
    assert "debug" in names["plans"]


@pytest.mark.parametrize("kind,name", ENTRIES)
def test_every_catalog_entry_loads_and_round_trips(kind, name):
    spec = LOADERS[kind](name)
    assert isinstance(spec, CLASSES[kind])
    assert CLASSES[kind].parse(spec.to_dict()) == spec
    assert LOADERS[kind](CATALOG_DIR / kind / f"{name}.yaml") == spec  # a path loads the same
    assert LOADERS[kind](spec) is spec


def test_yaml_file_of_to_dict_loads_the_same(tmp_path):
    for kind, name in (("models", "llama-3-70b"), ("clusters", "8xh100"), ("plans", "megatron-gpt3-175b")):
        spec = LOADERS[kind](name)
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(spec.to_dict()))
        assert LOADERS[kind](str(path)) == spec
        assert LOADERS[kind](path).spec_hash() == spec.spec_hash()


def test_multi_node_cluster_names():
    node = load_cluster("8xa100-80gb")
    big = load_cluster("16x8xa100-80gb")
    assert big.num_devices == 128
    assert big.num_nodes == 16 and big.devices_per_node == 8
    assert big.name == "16x8xa100-80gb"
    assert big.device == node.device
    assert big.inter_node_bandwidth_GBps == node.inter_node_bandwidth_GBps
    assert load_cluster("1x8xh100").num_devices == 8
    with pytest.raises(SpecError):
        load_cluster("0x8xh100")


def test_h100_peak_is_dense_bf16():
    h100 = load_device("h100-sxm")
    assert h100.peak_flops == 989.5e12
    assert load_cluster("8xh100").device.peak_flops == 989.5e12
    assert load_device("a100-80gb").peak_flops == 312e12


def test_specs_are_frozen():
    model = load_model("gpt-debug")
    with pytest.raises(Exception):  # noqa: B017 - pydantic's frozen-instance error
        model.num_layers = 8


def test_cpu_rank_clusters_refuse_offloading_and_the_tuner_does_not_offer_it():
    from simulator.specs.catalog import load_cluster, load_model
    from simulator.specs.plan import TrainingPlan, validate_plan
    from tuner.training.space import layout_grid, layouts

    cluster, model = load_cluster("2xcpu"), load_model("gpt-debug")
    plan = TrainingPlan.parse({"tp": 1, "pp": 1, "dp": 2, "micro_batch_size": 1, "global_batch_size": 4,
                               "offload": {"optimizer": 1.0}})
    with pytest.raises(SpecError, match=r"plan.offload = \{'optimizer': 1.0\}: 2xcpu has no separate host memory"):
        validate_plan(plan, model, cluster)
    for lay in layouts(model, cluster, 4):
        grid = layout_grid(lay, cluster.host_offload)
        assert all(not grid[k].any() for k in ("o_w", "o_g", "o_o", "o_a"))


def test_a_link_slower_than_a_megabyte_per_second_is_refused_by_name():
    """Found by `make fuzz`: 1e-263 GB/s overflowed the inter-stage MILP's coefficients."""
    from simulator.specs.catalog import load_cluster

    spec = {"name": "x", "device": "a100-80gb", "num_nodes": 1, "devices_per_node": 2,
            "intra_node_bandwidth_GBps": 1e-263, "inter_node_bandwidth_GBps": 1}
    with pytest.raises(SpecError, match="intra_node_bandwidth_GBps"):
        load_cluster(spec)
