"""Hardware specs: a device, its achievable efficiencies, and a cluster of devices.

Datasheet peaks say what a device could do; `Efficiency` says what real kernels and
collectives achieve on it. Efficiencies are data, one set per device type, so a measured
profile from `profiler/` can replace the datasheet-derived defaults without code changes.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, field_validator

from simulator.specs.base import Spec

GiB = 1024**3
MAX_NODES = 1_000_000              # bounds that keep the tuners' divisor searches short; the largest
MAX_DEVICES_PER_NODE = 1_024       # clusters built hold ~10^5 GPUs, a node up to 72 (NVL72)
GB = 1e9
COSTS = ("gemm", "attention", "memory", "copies", "collectives", "step_overhead")
"""The device costs a measured profile can replace; reports say where each came from."""


MIN_GBPS = 1e-3
"""The slowest link or memory a spec may name, 1 MB/s: below it (a fuzzed 1e-263 GB/s) times
overflow what a solver or a float can carry, and no real device is that slow."""

class CollectiveEfficiency(Spec):
    """Alpha-beta parameters of collectives on one link level (NCCL-tests bus bandwidth)."""

    kind: ClassVar[str] = "collective"
    alpha_us: float = Field(ge=0, description="fixed latency per ring step, microseconds")
    efficiency: float = Field(gt=0, le=1, description="achieved bus bandwidth / link peak")


class Efficiency(Spec):
    """Achievable fractions of the datasheet peaks, and fixed overheads.

    GEMM efficiency saturates with the smallest GEMM dimension d:
    eff(d) = gemm_max * d / (d + gemm_half_dim); small per-rank shards (large TP) run below
    the large-GEMM efficiency, as cuBLAS tile quantization and wave effects predict.
    """

    kind: ClassVar[str] = "efficiency"
    gemm_max: float = Field(gt=0, le=1)
    gemm_half_dim: float = Field(ge=0)
    attention: float = Field(gt=0, le=1, description="attention core (batched GEMMs or flash)")
    attention_half_seq: float = Field(
        default=0.0, ge=0, description="sequence length at which the attention efficiency halves "
        "(a blocked causal kernel's diagonal blocks); 0: none")
    attention_curve: list[tuple[float, float]] | None = Field(
        default=None, description="measured causal prefill attention: (sequence length, efficiency in "
        "`attention`'s convention) points, ascending; where a length is known it replaces `attention` and "
        "`attention_half_seq`: interpolated in log length between the points of one kernel blocking "
        "(`attention_steps`), held beyond them (simulator/costs/timing.py)")
    attention_steps: list[float] = Field(
        default_factory=list, description="sequence lengths at which the attention kernel changes its query "
        "block (PyTorch's CPU flash kernel: 192 and 768); the curve is not interpolated across them")
    kv_read: float | None = Field(
        default=None, gt=0, le=1, description="achieved / peak memory bandwidth of attention reading the KV "
        "cache; default: memory_bound")
    attention_decode: float | None = Field(
        default=None, gt=0, le=1, description="one-query decode attention (a matrix-vector product per head); "
        "default: `attention`")
    memory_bound: float = Field(gt=0, le=1, description="achieved / peak HBM bandwidth")
    memory_bound_simple: float | None = Field(
        default=None, gt=0, le=1, description="achieved / peak memory bandwidth of simple element-wise ops "
        "(adds, multiplies, casts, copies): the extra passes of an eager layer; default: memory_bound")
    kernel_overhead_us: float = Field(ge=0)
    weight_stream: float | None = Field(
        default=None, gt=0, le=1, description="achieved / peak memory bandwidth streaming weights through "
        "few-row (decode) GEMMs; default: memory_bound")
    weight_stream_overhead_us: float | None = Field(
        default=None, ge=0, description="host time per few-row (decode) GEMM call; default: gemm_overhead_us")
    gemm_overhead_us: float = Field(
        default=0.0, ge=0, description="host time per GEMM call not hidden by asynchronous launch (CPU dispatch)"
    )
    step_overhead_us: float = Field(
        default=1500.0, ge=0, description="serving: fixed cost of one engine step (scheduling, sampling, launch)"
    )
    pcie: float = Field(gt=0, le=1, description="achieved / peak host link bandwidth")
    intra_node: CollectiveEfficiency
    inter_node: CollectiveEfficiency

    @field_validator("attention_curve")
    @classmethod
    def _curve(cls, v: list[tuple[float, float]] | None) -> list[tuple[float, float]] | None:
        if v is None:
            return v
        if not v:
            raise ValueError("must hold at least one (sequence length, efficiency) point, or be null")
        for seq, eff in v:
            if not (seq > 0 and 0 < eff <= 1):
                raise ValueError(f"point ({seq}, {eff}): sequence length must be > 0 and efficiency in (0, 1]")
        if any(a[0] >= b[0] for a, b in zip(v, v[1:])):
            raise ValueError("sequence lengths must be strictly ascending")
        return v


class DeviceSpec(Spec):
    """One accelerator as its datasheet describes it, plus achievable efficiencies."""

    kind: ClassVar[str] = "device"
    name: str
    source: Literal["datasheet", "measured"] = "datasheet"
    measured_on: str | None = None
    cost_sources: dict[str, str] = Field(
        default_factory=dict, description="cost -> where it came from, when a measured profile replaced it"
    )
    peak_tflops: dict[Literal["fp32", "tf32", "fp16", "bf16", "fp8"], float]
    memory_GiB: float = Field(gt=0)
    hbm_bandwidth_GBps: float = Field(ge=MIN_GBPS)
    pcie_bandwidth_GBps: float = Field(ge=MIN_GBPS, description="host link, one direction")
    nvlink_bandwidth_GBps: float = Field(ge=0, description="per device, one direction; 0: none")
    efficiency: Efficiency

    @field_validator("peak_tflops")
    @classmethod
    def _needs_16bit(cls, v: dict[str, float]) -> dict[str, float]:
        if "bf16" not in v and "fp16" not in v:
            raise ValueError("must give a dense 16-bit peak (bf16 or fp16)")
        if any(x <= 0 for x in v.values()):
            raise ValueError("peaks must be > 0")
        return v

    def source_of(self, cost: str) -> str:
        """'datasheet', or 'measured <date> (<profile>)' for a cost a profile replaced."""
        return self.cost_sources.get(cost, self.source)

    def sources(self) -> dict[str, str]:
        """Where each modelled cost comes from: the datasheet or a measured profile."""
        return {cost: self.source_of(cost) for cost in COSTS}

    @property
    def peak_flops(self) -> float:
        """Dense 16-bit peak in FLOP/s (the MFU denominator)."""
        return 1e12 * self.peak_tflops.get("bf16", self.peak_tflops.get("fp16", 0.0))

    @property
    def memory_bytes(self) -> float:
        return self.memory_GiB * GiB

    @property
    def hbm_bandwidth_bytes_per_s(self) -> float:
        return self.hbm_bandwidth_GBps * GB


class ClusterSpec(Spec):
    """Nodes x devices per node, with one intra-node and one inter-node link level.

    Bandwidths are per device and per direction, as DESIGN.md specifies.
    """

    kind: ClassVar[str] = "cluster"
    name: str
    device: DeviceSpec
    num_nodes: int = Field(ge=1, le=MAX_NODES)
    devices_per_node: int = Field(ge=1, le=MAX_DEVICES_PER_NODE)
    intra_node_link: Literal["nvlink", "pcie"] = "nvlink"
    intra_node_bandwidth_GBps: float = Field(ge=MIN_GBPS)
    inter_node_bandwidth_GBps: float = Field(ge=MIN_GBPS)
    host_link_bandwidth_GBps: float | None = Field(
        default=None, ge=MIN_GBPS, description="device<->host per device, one direction; default: the device's PCIe"
    )
    host_memory_GiB_per_device: float = Field(default=128.0, gt=0)
    host_optimizer_params_per_s: float = Field(
        default=1.0e9, gt=0, description="CPU Adam throughput per device's host share"
    )
    host_offload: bool = Field(
        default=True, description="devices can offload to a separate host memory over a host link; false for "
        "CPU ranks, whose memory is the host's")
    profile: str | None = Field(
        default=None, description="measured profile (catalog name or directory) whose costs replace the datasheet's"
    )
    host_cores_per_node: int | None = Field(
        default=None, ge=1, description="physical CPU cores of one node (machine); None: not described. The GNN "
        "simulator shares them among a machine's trainer, sampler and server processes")
    host_vcpus_per_node: int | None = Field(
        default=None, ge=1, description="hardware threads (vCPUs) of one node; default: host_cores_per_node")
    price_per_device_hour: float | None = Field(
        default=None, gt=0, allow_inf_nan=False, description="USD per device per hour (a node's hourly "
        "price over its devices); None: unknown. Reports and sweeps then add costs")
    price_source: str | None = Field(
        default=None, description="where price_per_device_hour comes from (a list price with its date, or "
        "'estimate: ...')")

    @field_validator("device", mode="before")
    @classmethod
    def _device_by_name(cls, v):
        if isinstance(v, str):
            from simulator.specs.catalog import load_device

            return load_device(v)
        return v

    @property
    def num_devices(self) -> int:
        return self.num_nodes * self.devices_per_node

    @property
    def price_per_s(self) -> float | None:
        """USD per second for all devices of the cluster, or None when the price is unknown."""
        if self.price_per_device_hour is None:
            return None
        return self.price_per_device_hour * self.num_devices / 3600.0

    def bandwidth_bytes_per_s(self, level: Literal["intra_node", "inter_node"]) -> float:
        gbps = (
            self.intra_node_bandwidth_GBps
            if level == "intra_node"
            else self.inter_node_bandwidth_GBps
        )
        return gbps * GB

    @property
    def host_memory_bytes_per_device(self) -> float:
        return self.host_memory_GiB_per_device * GiB

    def host_link_bytes_per_s(self) -> float:
        """Achievable device<->host bandwidth (PCIe), one direction."""
        d = self.device
        return (self.host_link_bandwidth_GBps or d.pcie_bandwidth_GBps) * GB * d.efficiency.pcie
