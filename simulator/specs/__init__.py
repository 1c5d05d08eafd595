"""The shared vocabulary of simtune: validated, frozen spec classes and their catalog."""

from simulator.specs.catalog import (
    catalog_names,
    load_cluster,
    load_device,
    load_model,
    load_plan,
)
from simulator.specs.hardware import ClusterSpec, CollectiveEfficiency, DeviceSpec, Efficiency
from simulator.specs.model import TransformerSpec
from simulator.specs.plan import Offload, StagePlan, TrainingPlan

__all__ = [
    "ClusterSpec",
    "CollectiveEfficiency",
    "DeviceSpec",
    "Efficiency",
    "Offload",
    "StagePlan",
    "TrainingPlan",
    "TransformerSpec",
    "catalog_names",
    "load_cluster",
    "load_device",
    "load_model",
    "load_plan",
]
