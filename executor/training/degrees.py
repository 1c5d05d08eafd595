"""The parallel degrees of one training run, checked once, and the device mesh they lay out.

Like torchtitan's `ParallelDims`, everything that asks "how many ranks along which axis"
reads this one frozen object: the runner (how many ranks to start, which slice of the batch
a rank trains on), `parallelize` (which sub-mesh a wrapper spans) and the dry run.

The mesh is row-major over ("pp", "dp_replicate", "dp_shard", "tp"), torchtitan's order:
tensor-parallel peers are neighbouring ranks (on a GPU node they share NVLink), and a
pipeline stage is a contiguous block of ranks. A dimension of size 1 is left out, except
"dp_shard", which is always there so that FSDP2 has a mesh to shard over even with one
data-parallel rank (CPU offload of a single device still goes through `fully_shard`).

"dp_shard" is the group ZeRO shards model states over (all of dp unless the plan asks for
HSDP with `dp_shard`), "dp_replicate" the HSDP replicas. DDP and ZeRO-1 run over "dp_shard",
which is then the whole data-parallel group (HSDP needs ZeRO-3 on every stage).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from simulator.errors import SpecError
from simulator.specs.hardware import ClusterSpec
from simulator.specs.plan import TrainingPlan

if TYPE_CHECKING:  # torch is imported only where a mesh is built
    from torch.distributed.device_mesh import DeviceMesh

MESH_DIMS = ("pp", "dp_replicate", "dp_shard", "tp")


@dataclass(frozen=True, slots=True)
class RankCoords:
    """Where one rank sits: its pipeline stage, data-parallel index and tensor-parallel index."""

    pp: int
    dp: int
    tp: int


@dataclass(frozen=True, slots=True)
class ParallelDegrees:
    """tp x pp x dp ranks; dp = dp_shard x replicas (HSDP), each checked on construction."""

    tp: int
    pp: int
    dp: int
    dp_shard: int
    replicas: int
    world_size: int

    def __post_init__(self) -> None:
        for name in ("tp", "pp", "dp", "dp_shard", "replicas", "world_size"):
            if getattr(self, name) < 1:
                raise SpecError(f"plan.{name}", getattr(self, name), "must be >= 1")
        if self.dp_shard * self.replicas != self.dp:
            raise SpecError("plan.dp_shard", self.dp_shard,
                            f"dp_shard x replicas = {self.dp_shard} x {self.replicas} must equal dp = {self.dp}")
        if self.tp * self.pp * self.dp != self.world_size:
            raise SpecError("plan", f"tp={self.tp} pp={self.pp} dp={self.dp}",
                            f"tp x pp x dp = {self.tp * self.pp * self.dp} must equal the "
                            f"{self.world_size} ranks of the run")

    @classmethod
    def of(cls, plan: TrainingPlan, cluster: ClusterSpec) -> ParallelDegrees:
        """The degrees of `plan` on `cluster` (one rank per device of the cluster)."""
        return cls(tp=plan.tp, pp=plan.pp, dp=plan.dp, dp_shard=plan.shard_degree,
                   replicas=plan.replicate_degree, world_size=cluster.num_devices)

    @property
    def hsdp(self) -> bool:
        return self.replicas > 1

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    # --- the mesh ---------------------------------------------------------------------------
    @property
    def mesh_shape(self) -> tuple[tuple[str, int], ...]:
        """(name, size) of each mesh dimension, outermost first (see the module docstring)."""
        sizes = dict(zip(MESH_DIMS, (self.pp, self.replicas, self.dp_shard, self.tp)))
        return tuple((n, s) for n, s in sizes.items() if s > 1 or n == "dp_shard")

    def coords(self, rank: int) -> RankCoords:
        """The mesh coordinates of `rank` (row-major over `mesh_shape`, as `init_device_mesh` lays it)."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} outside a world of {self.world_size}")
        tp_i, rest = rank % self.tp, rank // self.tp
        dp_i, pp_i = rest % self.dp, rest // self.dp  # dp index = replica x dp_shard + shard
        return RankCoords(pp=pp_i, dp=dp_i, tp=tp_i)

    def build_mesh(self, device_type: str) -> DeviceMesh:
        """The world's device mesh; needs an initialized default process group of world_size ranks."""
        from torch.distributed.device_mesh import init_device_mesh

        names, sizes = zip(*self.mesh_shape)
        return init_device_mesh(device_type, sizes, mesh_dim_names=names)

    def dp_mesh(self, mesh: DeviceMesh) -> DeviceMesh:
        """The data-parallel sub-mesh: 2-D (replicate, shard) under HSDP, else 1-D "dp_shard"."""
        return mesh["dp_replicate", "dp_shard"] if self.hsdp else mesh["dp_shard"]

    @staticmethod
    def tp_mesh(mesh: DeviceMesh) -> DeviceMesh:
        return mesh["tp"]

    @staticmethod
    def pp_mesh(mesh: DeviceMesh) -> DeviceMesh:
        return mesh["pp"]
