"""The catalog: named specs shipped as YAML, and loading by name, path or mapping.

Every spec argument accepts a catalog name (`llama-3-8b`, `8xh100`), a path to a YAML/JSON
file of the same schema, a mapping, or an already-built spec. Clusters also accept the
multi-node form `N x node`, e.g. `16x8xa100-80gb` is 16 nodes of the `8xa100-80gb` node and
`16xm5n-24xlarge` 16 machines of the `m5n-24xlarge` node; `Nxcpu` (any N) is N one-core ranks on
this machine, as the catalog's `1xcpu` and `2xcpu`.
"""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path
from typing import Any, TypeVar

import yaml

from simulator.errors import SpecError
from simulator.specs.base import Spec
from simulator.specs.gnn import GNNModelSpec, GNNPlan
from simulator.specs.graph import GraphSpec
from simulator.specs.hardware import MAX_DEVICES_PER_NODE, MAX_NODES, ClusterSpec, DeviceSpec
from simulator.specs.model import TransformerSpec
from simulator.specs.plan import TrainingPlan
from simulator.specs.profile import META_FILE, apply_profile, resolve_profile_path
from simulator.specs.serving import DeploymentSpec, EngineSpec, WorkloadSpec

CATALOG_DIR = Path(__file__).parent / "catalog"
KINDS = {
    "devices": DeviceSpec, "clusters": ClusterSpec, "models": TransformerSpec, "plans": TrainingPlan,
    "deployments": DeploymentSpec, "workloads": WorkloadSpec, "engines": EngineSpec,
    "graphs": GraphSpec, "gnn_models": GNNModelSpec, "gnn_plans": GNNPlan,
}
_MULTI_NODE = re.compile(r"^(\d+)x(.+)$")
_CPU_RANKS = re.compile(r"^(\d+)xcpu$")

S = TypeVar("S", bound=Spec)


@cache
def _entries(kind: str) -> dict[str, Path]:
    return {p.stem: p for p in sorted((CATALOG_DIR / kind).glob("*.yaml"))}


def catalog_names(kind: str | None = None) -> dict[str, list[str]]:
    """Names in the catalog, by kind (devices, clusters, models, plans)."""
    kinds = [kind] if kind else list(KINDS)
    return {k: list(_entries(k)) for k in kinds}


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise SpecError(str(path), "<file>", f"is not valid YAML: {err}") from None
    except UnicodeDecodeError as err:
        raise SpecError(str(path), "<file>", f"is not a text (UTF-8) file: {err.reason} at byte {err.start}") from None
    except OSError as err:  # a directory, no permission, a broken disk
        raise SpecError(str(path), "<file>", f"cannot be read: {err.strerror or err}") from None
    if not isinstance(data, dict):
        raise SpecError(str(path), type(data).__name__, "must hold a mapping of fields")
    return data


def _load(kind: str, ref: Any, what: str) -> Spec:
    cls = KINDS[kind]
    if isinstance(ref, cls):
        return ref
    if isinstance(ref, dict):
        return cls.parse(ref)
    if not isinstance(ref, (str, Path)):
        raise SpecError(what, ref, "must be a catalog name, a file path, or a mapping")
    name = str(ref)
    if not name.strip() or "\x00" in name:
        raise SpecError(what, name, f"must name a {kind[:-1]}: a catalog name or a YAML file (no NUL characters)")
    if name in _entries(kind):
        return cls.parse(read_yaml(_entries(kind)[name]))
    path = Path(name)
    if path.suffix in (".yaml", ".yml", ".json") or path.exists():
        if not path.exists():
            raise SpecError(what, name, "file does not exist")
        if path.is_dir():
            raise SpecError(what, name, "is a directory; give a YAML file or a catalog name")
        return cls.parse(read_yaml(path))
    known = ", ".join(_entries(kind))
    raise SpecError(what, name, f"unknown {kind[:-1]}; catalog names are: {known}")


@cache
def _load_named(kind: str, name: str) -> Spec:
    return _load(kind, name, kind[:-1])


def _load_any(kind: str, ref: Any, what: str) -> Spec:
    if isinstance(ref, str) and ref in _entries(kind):
        return _load_named(kind, ref)  # catalog entries are immutable: parse once
    return _load(kind, ref, what)


def load_device(ref: Any) -> DeviceSpec:
    return _load_any("devices", ref, "device")


def load_model(ref: Any) -> TransformerSpec:
    return _load_any("models", ref, "model")


def load_plan(ref: Any) -> TrainingPlan:
    return _load_any("plans", ref, "plan")


def load_deployment(ref: Any) -> DeploymentSpec:
    return _load_any("deployments", ref, "deployment")


def load_engine(ref: Any) -> EngineSpec:
    return _load_any("engines", ref, "deployment.engine")


def load_workload(ref: Any) -> WorkloadSpec:
    return _load_any("workloads", ref, "workload")


def load_graph(ref: Any) -> GraphSpec:
    """A graph by catalog name, path or mapping. The files of a graph spec loaded from a path
    are relative to that file's directory."""
    graph = _load_any("graphs", ref, "graph")
    if graph.files is not None and isinstance(ref, (str, Path)) and Path(ref).is_file():
        base = Path(ref).resolve().parent
        moved = {k: str(base / v) for k, v in graph.files.model_dump().items()
                 if k in ("edges", "features", "labels", "train_mask") and v is not None
                 and not Path(v).is_absolute()}
        graph = graph.model_copy(update={"files": graph.files.model_copy(update=moved)})
    return graph


def load_gnn_model(ref: Any) -> GNNModelSpec:
    return _load_any("gnn_models", ref, "gnn_model")


def load_gnn_plan(ref: Any) -> GNNPlan:
    return _load_any("gnn_plans", ref, "gnn_plan")


def load_cluster(ref: Any, profile: str | Path | None = None) -> ClusterSpec:
    """A cluster by name, `NxNODE` multi-node name, path, or mapping.

    Its device's costs come from `profile` (a measured profile directory or catalog name), else
    from the profile the cluster spec names, else from the datasheet; `profile="none"` forces
    the datasheet even where the spec names a profile."""
    cluster = _load_cluster(ref)
    if profile is not None and str(profile) == "none":
        return cluster.model_copy(update={"profile": None}) if cluster.profile else cluster
    chosen = profile if profile is not None else cluster.profile
    if chosen is None or (profile is None and cluster.device.cost_sources):
        return cluster  # datasheet, or the spec's profile already applied
    return _with_profile(cluster, str(chosen))


def _load_cluster(ref: Any) -> ClusterSpec:
    if isinstance(ref, str) and ref not in _entries("clusters"):
        m = _MULTI_NODE.match(ref)
        if m and m.group(2) in _entries("clusters"):
            node = _load_named("clusters", m.group(2))
            nodes = int(m.group(1))
            if not 1 <= nodes * node.num_nodes <= MAX_NODES:
                raise SpecError("cluster", ref, f"needs between 1 and {MAX_NODES:,} nodes")
            return node.model_copy(update={"name": ref, "num_nodes": nodes * node.num_nodes})
        m = _CPU_RANKS.match(ref)
        if m and int(m.group(1)) >= 1:  # N one-core ranks on one machine, like 1xcpu and 2xcpu
            ranks = int(m.group(1))
            if ranks > MAX_DEVICES_PER_NODE:
                raise SpecError("cluster", ref, f"at most {MAX_DEVICES_PER_NODE:,} CPU ranks on one machine")
            one = _load_named("clusters", "1xcpu")
            return one.model_copy(update={"name": ref, "devices_per_node": ranks})
    return _load_any("clusters", ref, "cluster")


_PROFILED: dict[tuple[str, str, float], ClusterSpec] = {}


def _with_profile(cluster: ClusterSpec, profile: str) -> ClusterSpec:
    """apply_profile, once per (cluster content, profile, profile file version)."""
    meta = resolve_profile_path(profile) / META_FILE
    key = (cluster.spec_hash(), profile, meta.stat().st_mtime if meta.exists() else 0.0)
    if key not in _PROFILED:
        _PROFILED[key] = apply_profile(cluster, profile)
    return _PROFILED[key]
