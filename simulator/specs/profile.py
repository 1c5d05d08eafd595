"""Measured hardware profiles: the directory format, loading it, and what it changes in a device.

`simtune profile` (package `profiler/`) measures kernels, copies, collectives and decode
steps on a real machine and writes a profile directory; the simulator only reads it.

Format `simtune-profile`, version 1
-----------------------------------
```
DIR/profile.json    {"format": "simtune-profile", "version": 1,
                     "device": {kind, name, cores, threads, driver, cuda, torch, date, host, platform},
                     "tables": {"<op>": {"file", "rows"}},
                     "fits":   {"<op>": {... fitted parameters, "cv_median_abs_error", "samples"}}}
DIR/gemm.csv        m, n, k, dtype, flops, bytes, median_s, p10_s, p90_s, reps
DIR/attention.csv   phase, batch, seq_q, seq_kv, heads, kv_heads, head_dim, dtype, flops, bytes, timing
DIR/memory.csv      op, elements, dtype, bytes, timing
DIR/copies.csv      direction, pinned, bytes, timing
DIR/collectives.csv backend, collective, bytes, ranks, timing
DIR/decode.csv      phase, batch, context, new_tokens, timing
DIR/gnn.csv         op, rows, fanout, width, d_out, frontier, ranks, src, edges, candidates, elements,
                    params, timing (optional)
```
One row per measured shape, SI units (seconds, bytes, FLOPs); `timing` is median_s, p10_s,
p90_s and reps. The key columns of each table (TABLES) identify a shape.

The fits (see `profiler/fit.py`) are physical quantities, not efficiencies:
- `gemm`: {dtype: {flops_per_s, half_dim, overhead_s, stream: {bytes_per_s, ...}}}; time =
  flops (1 + half_dim / d) / flops_per_s + overhead_s, d the smallest GEMM dimension
  (`Efficiency`'s saturation form); `stream`: few-row (decode) GEMMs over weights larger than
  the caches, bound by streaming them;
- `attention`: {dtype: {flops_per_s, bytes_per_s, overhead_s, decode_flops_per_s, diagonal_keys,
  prefill_curve: [[seq, flops_per_s], ...], q_block_steps (CPU)}}; the curve is the measured
  causal prefill rate at each length, which the simulator reads where a length is known;
- `memory`: {bytes_per_s, overhead_s, by_dtype, by_op: {op: {..., by_dtype}}} over norms,
  softmax, element-wise, embedding, optimizer;
- `copies`: {"<direction>[_pinned]": {bytes_per_s, overhead_s}};
- `collectives`: {backend: {collective: {ranks: {alpha_s, bus_bytes_per_s}}}};
- `decode`: {intercept_s, per_token_s, per_context_token_s, per_attention_pair_s,
  step_overhead_s} of the real decoder's steps (`step_overhead_s`: its `host` row, the Python
  and dispatch time of a step whose kernels do almost no work).
- `gnn` (optional): {op: {<coefficient>: seconds per term, ..., cv_median_abs_error, samples}}
  for the GNN executor's operations (sample, to_block, aggregate[_input], linear[_input],
  relu_dropout, optimizer, gat_attention, fetch); the terms of each are
  `simulator.gnn.costs.OP_TERMS`; `lockstep`: {"<ranks>": {sample, fetch, compute: ratio of the
  operations on that many ranks at once, the slowest rank's time, to one alone; by_op}}.
A table may carry its own `device` block (`tables.<op>.device`) when a later run added it on
another machine of the same kind and thread count; it then describes where that table was measured.
`apply_profile` turns them into a device's `Efficiency` by dividing by its datasheet peaks,
and records which cost came from where (`DeviceSpec.cost_sources`).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from simulator.errors import SpecError

FORMAT = "simtune-profile"
VERSION = 1
META_FILE = "profile.json"
PROFILES_DIR = Path(__file__).parent / "catalog" / "profiles"
TIMING = ("median_s", "p10_s", "p90_s", "reps")


@dataclass(frozen=True)
class TableSpec:
    file: str
    key: tuple[str, ...]
    values: tuple[str, ...] = ()
    added: tuple[tuple[str, Callable[[Any], Any]], ...] = ()
    """Columns a later version added, each with what stands in for it in an older table."""

    @property
    def columns(self) -> tuple[str, ...]:
        return (*self.key, *self.values, *TIMING)


TABLES: dict[str, TableSpec] = {
    "gemm": TableSpec("gemm.csv", ("m", "n", "k", "dtype"), ("flops", "bytes")),
    "attention": TableSpec("attention.csv", ("phase", "batch", "seq_q", "seq_kv", "heads", "kv_heads",
                                             "head_dim", "dtype"), ("flops", "bytes")),
    "memory": TableSpec("memory.csv", ("op", "elements", "dtype"), ("bytes",)),
    "copies": TableSpec("copies.csv", ("direction", "pinned", "bytes")),
    "collectives": TableSpec("collectives.csv", ("backend", "collective", "bytes", "ranks")),
    "decode": TableSpec("decode.csv", ("phase", "batch", "context", "new_tokens")),
    "gnn": TableSpec("gnn.csv", ("op", "rows", "fanout", "width", "d_out", "frontier", "ranks"),
                     ("src", "edges", "candidates", "elements", "params"),
                     added=(("frontier", lambda df: "uniform"), ("candidates", lambda df: df["edges"]),
                            ("ranks", lambda df: 1))),
}
OPS = tuple(TABLES)


class ProfileError(SpecError):
    """A profile directory that cannot be used: names the file, the field and what is wrong."""

    def __init__(self, path: Path | str, field: str, value: Any, allowed: str):
        self.path = Path(path)
        super().__init__(f"{self.path}: {field}", value, allowed)


def read_meta(root: Path | str) -> dict[str, Any]:
    """profile.json of a profile directory, checked for format, version and its required fields."""
    root = Path(root)
    path = root / META_FILE
    if not root.is_dir():
        raise ProfileError(root, "profile", str(root), "is not a directory (give a profile directory "
                           "written by `simtune profile --out DIR`)")
    if not path.exists():
        raise ProfileError(path, "file", "missing", "a profile directory holds profile.json; "
                           "this one is empty or was not written by `simtune profile`")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as err:
        raise ProfileError(path, "<file>", "not JSON", f"is corrupt: {err}") from None
    if not isinstance(meta, dict):
        raise ProfileError(path, "<file>", type(meta).__name__, "must hold a JSON object")
    if meta.get("format") != FORMAT:
        raise ProfileError(path, "format", meta.get("format"), f"must be {FORMAT!r}")
    if meta.get("version") != VERSION:
        raise ProfileError(path, "version", meta.get("version"),
                           f"this simtune reads version {VERSION}; re-run `simtune profile` to rewrite it")
    for key, kind in (("device", dict), ("tables", dict), ("fits", dict)):
        if not isinstance(meta.get(key), kind):
            raise ProfileError(path, key, meta.get(key), f"must be a JSON {kind.__name__}")
    for key in ("kind", "name", "threads", "date"):
        if key not in meta["device"]:
            raise ProfileError(path, f"device.{key}", None, "is required")
    for op, entry in meta["tables"].items():
        if op not in TABLES:
            raise ProfileError(path, f"tables.{op}", op, f"unknown table; known: {', '.join(TABLES)}")
        table = root / TABLES[op].file
        if not table.exists():
            raise ProfileError(table, "file", "missing", f"profile.json lists {entry.get('rows')} rows of "
                               f"{op!r}; the directory is partial: re-run `simtune profile` on it to resume")
    return meta


@dataclass(frozen=True)
class HardwareProfile:
    """A loaded profile: where it lives, what was measured on what, and the fits."""

    root: Path
    device: dict[str, Any]
    tables: dict[str, Any]
    fits: dict[str, Any] = field(default_factory=dict)

    @property
    def date(self) -> str:
        return str(self.device["date"])[:10]

    @property
    def ref(self) -> str:
        """How to name this profile again: its catalog name, or its directory."""
        return self.root.name if self.root.parent == PROFILES_DIR.resolve() else str(self.root)

    @property
    def label(self) -> str:
        """How reports name this source: 'measured <date> (<profile dir name>)'."""
        return f"measured {self.date} ({self.root.name})"

    def fit(self, op: str) -> dict[str, Any] | None:
        return self.fits.get(op)

    def frame(self, op: str):
        """The measured table of `op` as a pandas DataFrame (pandas is imported on demand)."""
        import pandas as pd  # noqa: PLC0415 - only tables need pandas

        if op not in self.tables:
            raise ProfileError(self.root / META_FILE, f"tables.{op}", None,
                               f"this profile did not measure {op!r}; measured: {', '.join(self.tables) or 'nothing'}")
        path = self.root / TABLES[op].file
        try:
            df = pd.read_csv(path)
        except Exception as err:  # noqa: BLE001 - any parse failure is a corrupt file
            raise ProfileError(path, "<file>", "unreadable", f"is corrupt: {err}") from None
        df = with_added_columns(op, df)
        missing = [c for c in TABLES[op].columns if c not in df.columns]
        if missing:
            raise ProfileError(path, "columns", missing, f"are required: {', '.join(TABLES[op].columns)}")
        return df


def with_added_columns(op: str, df):
    """`df` (a table of `op`) with the columns later versions added filled in where it lacks them."""
    for column, stand_in in TABLES[op].added:
        if column not in df.columns:
            df = df.assign(**{column: stand_in(df)})
    return df


def resolve_profile_path(ref: str | Path) -> Path:
    """A profile by catalog name (simulator/specs/catalog/profiles/<name>) or directory path."""
    name = str(ref)
    if not name.strip() or "\x00" in name:
        raise SpecError("profile", name, "must name a profile directory or a catalog profile (no NUL characters)")
    if (PROFILES_DIR / name).is_dir() and "/" not in name:
        return PROFILES_DIR / name
    return Path(name)


@cache
def _load(path: Path, mtime: float) -> HardwareProfile:
    meta = read_meta(path)
    return HardwareProfile(path, meta["device"], meta["tables"], meta.get("fits", {}))


def load_profile(ref: str | Path | HardwareProfile) -> HardwareProfile:
    if isinstance(ref, HardwareProfile):
        return ref
    path = resolve_profile_path(ref).resolve()
    meta_file = path / META_FILE
    return _load(path, meta_file.stat().st_mtime if meta_file.exists() else 0.0)


# --- what a profile changes in a cluster ------------------------------------------------------
def _rate(profile: HardwareProfile, op: str, path: str, value: Any, peak: float, peak_name: str) -> float:
    """measured / datasheet peak, checked to be a fraction: a measured rate above the datasheet
    peak means the device spec's peak is wrong, which must not pass silently."""
    if not isinstance(value, (int, float)) or value <= 0:
        raise ProfileError(profile.root / META_FILE, f"fits.{op}.{path}", value, "must be a positive number")
    frac = float(value) / peak
    if frac > 1.0:
        raise ProfileError(profile.root / META_FILE, f"fits.{op}.{path}", value,
                           f"exceeds the device spec's {peak_name} ({peak:.4g}); correct the device's datasheet "
                           "figure or profile the device the cluster names")
    return frac


def _dtype_fit(profile: HardwareProfile, op: str, dtypes: tuple[str, ...]) -> tuple[str, dict] | None:
    fits = profile.fit(op) or {}
    for dtype in dtypes:
        if isinstance(fits.get(dtype), dict):
            return dtype, fits[dtype]
    return None


def apply_profile(cluster, profile: str | Path | HardwareProfile, dtypes: tuple[str, ...] = ("bf16", "fp16")):
    """`cluster` with its device's efficiencies (and measured link) replaced by `profile`'s fits.

    GEMM and attention rates of the first of `dtypes` the profile measured (the 16-bit ones
    the simulator's training and serving models assume) become fractions of the device's
    dense 16-bit peak; the memory-kernel bandwidth a fraction of its memory bandwidth, with the
    fitted launch cost as `kernel_overhead_us`; pinned host-to-device copies set `pcie`; the
    all-reduce of the largest measured rank count sets the intra-node link (its bus bandwidth
    becomes the link's, at efficiency 1, and its latency the per-step alpha). Costs the profile
    did not measure keep their datasheet values; `cost_sources` records which is which. A
    cluster of CPU ranks takes the datasheet of the CPU the profile measured (`_ranks_device`)."""
    profile = load_profile(profile)
    device = _ranks_device(cluster, profile)
    eff = device.efficiency.model_dump()
    sources: dict[str, str] = {}
    cluster_update: dict[str, Any] = {}
    if (found := _dtype_fit(profile, "gemm", dtypes)) is not None:
        dtype, g = found
        eff["gemm_max"] = _rate(profile, "gemm", f"{dtype}.flops_per_s", g.get("flops_per_s"),
                                device.peak_flops, "dense 16-bit peak FLOP/s")
        eff["gemm_half_dim"] = float(g.get("half_dim", 0.0))
        eff["gemm_overhead_us"] = float(g.get("overhead_s", 0.0)) * 1e6
        if isinstance(g.get("stream"), dict) and g["stream"].get("bytes_per_s"):
            eff["weight_stream"] = _rate(profile, "gemm", f"{dtype}.stream.bytes_per_s", g["stream"]["bytes_per_s"],
                                         device.hbm_bandwidth_bytes_per_s, "memory bandwidth")
            eff["weight_stream_overhead_us"] = float(g["stream"].get("overhead_s", 0.0)) * 1e6
        sources["gemm"] = profile.label
    if (found := _dtype_fit(profile, "attention", dtypes)) is not None:
        # The profile counts the FLOPs a causal kernel computes (the visible half of the s x s
        # scores); `Efficiency.attention` applies to the simulator's count, the full square
        # (Megatron-LM's convention, which the datasheet fractions were set against): the kernel
        # covers that count at twice its measured rate.
        dtype, a = found
        rate = a.get("flops_per_s")
        eff["attention"] = _rate(profile, "attention", f"{dtype}.flops_per_s", 2 * rate if rate else rate,
                                 device.peak_flops, "dense 16-bit peak FLOP/s (the rate doubled: causal half)")
        if a.get("bytes_per_s"):
            eff["kv_read"] = _rate(profile, "attention", f"{dtype}.bytes_per_s", a["bytes_per_s"],
                                   device.hbm_bandwidth_bytes_per_s, "memory bandwidth")
        if a.get("diagonal_keys"):  # extra keys per query row (per token): efficiency halves at twice that
            eff["attention_half_seq"] = 2.0 * float(a["diagonal_keys"])
        if a.get("prefill_curve"):  # the measured rate at each prefill length, doubled as above
            eff["attention_curve"] = [(float(seq), _rate(profile, "attention", f"{dtype}.prefill_curve[{seq:g}]",
                                                         2 * r, device.peak_flops, "dense 16-bit peak FLOP/s"))
                                      for seq, r in a["prefill_curve"]]
            eff["attention_steps"] = [float(x) for x in a.get("q_block_steps", [])]
        if a.get("decode_flops_per_s"):
            eff["attention_decode"] = _rate(profile, "attention", f"{dtype}.decode_flops_per_s",
                                            a["decode_flops_per_s"], device.peak_flops, "dense 16-bit peak FLOP/s")
        sources["attention"] = profile.label
    if (m := profile.fit("memory")) is not None:
        rate, overhead = _layer_elementwise_rate(m, dtypes)
        eff["memory_bound"] = _rate(profile, "memory", "bytes_per_s", rate,
                                    device.hbm_bandwidth_bytes_per_s, "memory bandwidth")
        eff["kernel_overhead_us"] = overhead * 1e6
        if (simple := _harmonic_rate(m, SIMPLE_ELEMENTWISE_OPS, dtypes)) is not None:
            eff["memory_bound_simple"] = _rate(profile, "memory", "by_op.add|mul.bytes_per_s", simple[0],
                                               device.hbm_bandwidth_bytes_per_s, "memory bandwidth")
        sources["memory"] = profile.label
    copies = profile.fit("copies") or {}
    if isinstance(copies.get("h2d_pinned"), dict):
        eff["pcie"] = _rate(profile, "copies", "h2d_pinned.bytes_per_s", copies["h2d_pinned"].get("bytes_per_s"),
                            device.pcie_bandwidth_GBps * 1e9, "host link bandwidth")
        sources["copies"] = profile.label
    if (ar := _largest_allreduce(profile)) is not None:
        ranks, fit = ar
        eff["intra_node"] = {"alpha_us": float(fit["alpha_s"]) * 1e6 / (2 * (ranks - 1)), "efficiency": 1.0}
        cluster_update["intra_node_bandwidth_GBps"] = float(fit["bus_bytes_per_s"]) / 1e9
        sources["collectives"] = profile.label
    if isinstance(profile.fit("gnn"), dict) and profile.fit("gnn").get("samples"):
        own = profile.tables.get("gnn", {}).get("device")   # measured on another machine than the rest
        sources["gnn"] = f"measured {str(own['date'])[:10]} ({profile.root.name})" if own else profile.label
    if (d := profile.fit("decode")) is not None and "step_overhead_s" in d:
        eff["step_overhead_us"] = float(d["step_overhead_s"]) * 1e6
        sources["step_overhead"] = profile.label
    new_device = device.model_copy(update={
        "efficiency": type(device.efficiency).parse(eff, prefix=f"{profile.root / META_FILE}: efficiency"),
        "cost_sources": {**device.cost_sources, **sources},
        "measured_on": profile.date if sources else device.measured_on,
    })
    return cluster.model_copy(update={"device": new_device, "profile": profile.ref, **cluster_update})


LAYER_ELEMENTWISE_OPS = ("layer_norm", "rms_norm", "gelu", "silu", "add", "mul")
"""The element-wise ops a transformer layer runs outside its GEMMs and attention."""


SIMPLE_ELEMENTWISE_OPS = ("add", "mul")
"""The ops an eager layer's extra passes are made of (casts, products, sums): `memory_bound_simple`."""


def _harmonic_rate(memory: dict[str, Any], ops: tuple[str, ...], dtypes: tuple[str, ...]) -> tuple[float, float] | None:
    """(bytes/s, seconds per kernel) over `ops`, each moving about as many bytes (their times
    add): the harmonic mean of their per-op rates in the first of `dtypes` the profile fitted
    per op; None without per-op fits."""
    by_op = memory.get("by_op", {})
    for dtype in dtypes:
        fits = [by_op[op]["by_dtype"][dtype] for op in ops
                if isinstance(by_op.get(op, {}).get("by_dtype", {}).get(dtype), dict)]
        fits = [f for f in fits if isinstance(f.get("bytes_per_s"), (int, float)) and f["bytes_per_s"] > 0]
        if fits:
            rate = len(fits) / sum(1.0 / f["bytes_per_s"] for f in fits)
            return rate, sum(float(f.get("overhead_s", 0.0)) for f in fits) / len(fits)
    return None


def _layer_elementwise_rate(memory: dict[str, Any], dtypes: tuple[str, ...]) -> tuple[Any, float]:
    """(bytes/s, seconds per kernel) for the simulator's one memory-bound efficiency.

    Where the profile fitted each op per dtype, the rate is the harmonic mean over the ops a
    layer runs (`_harmonic_rate`), in the first of `dtypes` measured: on a CPU these ops differ
    several-fold (a bf16 norm widens to fp32 and runs at a fraction of an add's rate), so the
    pooled fit over all ops would be the wrong average. Otherwise the fit per dtype, else the
    single rate."""
    if (found := _harmonic_rate(memory, LAYER_ELEMENTWISE_OPS, dtypes)) is not None:
        return found
    rates = next((memory["by_dtype"][d] for d in dtypes if isinstance(memory.get("by_dtype", {}).get(d), dict)), memory)
    return rates.get("bytes_per_s"), float(rates.get("overhead_s", 0.0))


CUDA_DEVICES = {"H200": "h200", "H100": "h100-sxm", "A100-SXM4-80GB": "a100-80gb", "A100-SXM4-40GB": "a100-40gb",
                "A100 80GB": "a100-80gb", "A10G": "a10g", "L4": "l4", "V100": "v100-32gb"}
"""torch.cuda.get_device_name() substrings -> catalog device, most specific first."""


CPU_DEVICES = {"Intel(R) Xeon(R)": "cpu-xeon"}
"""CPU model-name substrings -> catalog device of one core; any other CPU is `cpu` (the AMD EPYC)."""


def catalog_device_of(device_meta: dict[str, Any]) -> str | None:
    """The catalog device a profile measured (whose datasheet it is compared with), if known."""
    name = str(device_meta.get("name", ""))
    if device_meta.get("kind") == "cpu":
        return next((catalog for key, catalog in CPU_DEVICES.items() if key in name), "cpu")
    return next((catalog for key, catalog in CUDA_DEVICES.items() if key in name), None)


def _ranks_device(cluster, profile: HardwareProfile):
    """The device of `cluster` under `profile`: a cluster of one-core CPU ranks (`Nxcpu`) is the
    cores of the machine that measured the profile, so a profile of another CPU model brings
    that CPU's datasheet (its peaks are what the profile's rates are compared with)."""
    from simulator.specs.catalog import load_device  # noqa: PLC0415 - the catalog imports this module

    cpu_devices = {"cpu", *CPU_DEVICES.values()}
    measured = catalog_device_of(profile.device)
    if cluster.device.name in cpu_devices and measured in cpu_devices and measured != cluster.device.name:
        return load_device(measured)
    return cluster.device


def profile_applies(cluster, profile: str | Path | HardwareProfile) -> bool:
    """Whether `profile` measured the kind of device `cluster` has (by catalog device name)."""
    from simulator.specs.catalog import load_device  # noqa: PLC0415 - the catalog imports this module

    if str(profile) == "none":
        return False
    catalog = catalog_device_of(load_profile(profile).device)
    return catalog is not None and load_device(catalog).name == cluster.device.name


def _largest_allreduce(profile: HardwareProfile) -> tuple[int, dict] | None:
    coll = profile.fit("collectives") or {}
    best: tuple[int, dict] | None = None
    for backend, per in coll.items():
        if not isinstance(per, dict) or not isinstance(per.get("all_reduce"), dict):
            continue
        for ranks, fit in per["all_reduce"].items():
            if isinstance(fit, dict) and int(ranks) >= 2 and (best is None or int(ranks) > best[0]):
                for key in ("alpha_s", "bus_bytes_per_s"):
                    if not isinstance(fit.get(key), (int, float)):
                        raise ProfileError(profile.root / META_FILE, f"fits.collectives.{backend}.all_reduce."
                                           f"{ranks}.{key}", fit.get(key), "must be a number")
                best = (int(ranks), fit)
    return best
