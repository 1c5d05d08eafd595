"""The shared vocabulary of simtune: validated, frozen spec classes and their catalog."""

from simulator.specs.catalog import (
    catalog_names,
    load_cluster,
    load_deployment,
    load_device,
    load_engine,
    load_gnn_model,
    load_gnn_plan,
    load_graph,
    load_model,
    load_plan,
    load_workload,
)
from simulator.specs.gnn import GNNModelSpec, GNNPlan
from simulator.specs.graph import GraphFiles, GraphSpec
from simulator.specs.hardware import ClusterSpec, CollectiveEfficiency, DeviceSpec, Efficiency
from simulator.specs.model import TransformerSpec
from simulator.specs.plan import Offload, StagePlan, TrainingPlan
from simulator.specs.serving import DeploymentSpec, EngineSpec, LengthDist, Parallel, WorkloadSpec

__all__ = [
    "ClusterSpec",
    "DeploymentSpec",
    "EngineSpec",
    "LengthDist",
    "Parallel",
    "WorkloadSpec",
    "CollectiveEfficiency",
    "DeviceSpec",
    "Efficiency",
    "GNNModelSpec",
    "GNNPlan",
    "GraphFiles",
    "GraphSpec",
    "Offload",
    "StagePlan",
    "TrainingPlan",
    "TransformerSpec",
    "catalog_names",
    "load_cluster",
    "load_deployment",
    "load_device",
    "load_engine",
    "load_gnn_model",
    "load_gnn_plan",
    "load_graph",
    "load_model",
    "load_plan",
    "load_workload",
]
