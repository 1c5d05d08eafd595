"""The profile directory on disk: measured tables, resumable, written atomically.

A profile directory holds one tidy CSV per op family (`gemm.csv`, `attention.csv`, ...), one
row per measured shape, keyed by the family's key columns (`simulator.specs.profile.TABLES`),
and `profile.json`: the format name and version, the machine (device, cores, threads,
driver, torch, date, host), the tables, and the fits `profiler.fit` derives from them.
The simulator reads only this directory (`simulator.specs.profile.load_profile`).

Every write replaces the whole file through a temporary file and `os.replace`, so an
interrupted run leaves the last complete table, and a rerun measures only the shapes that
table does not have yet (`Table.has`). A run that adds only new families may come from another
machine of the same kind; their tables then keep that machine's block (`tables.<op>.device`).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import socket
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from simulator.files import write_text_atomic
from simulator.specs.profile import (
    FORMAT,
    META_FILE,
    PROFILES_DIR,
    TABLES,
    VERSION,
    ProfileError,
    read_meta,
    with_added_columns,
)


def machine_meta(device: str, threads: int) -> dict[str, Any]:
    """What was measured: the `device` block of profile.json."""
    cuda = device.startswith("cuda")
    name = torch.cuda.get_device_name(device) if cuda else _cpu_model()
    return {
        "kind": "cuda" if cuda else "cpu",
        "name": name,
        "cores": os.cpu_count(),
        "threads": threads,
        "driver": _cuda_driver() if cuda else None,
        "cuda": torch.version.cuda if cuda else None,
        "torch": torch.__version__.split("+")[0],
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "host": socket.gethostname(),
        "platform": platform.platform(),
    }


def _cpu_model() -> str:
    info = Path("/proc/cpuinfo")
    if info.exists():
        for line in info.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def this_machines_profile(threads: int = 1) -> str | None:
    """The catalog profile measured on a CPU like this one (same model name, `threads` per
    process), if one is committed: what a prediction of this machine's own ranks should use,
    since the `Nxcpu` clusters name the profile of the machine simtune was first built on."""
    name = _cpu_model()
    for root in sorted(PROFILES_DIR.iterdir()):
        try:
            device = read_meta(root)["device"]
        except ProfileError:
            continue
        if device.get("kind") == "cpu" and device.get("name") == name and device.get("threads") == threads:
            return root.name
    return None


def _cuda_driver() -> str | None:
    try:
        import pynvml  # noqa: PLC0415 - optional, only on GPU machines

        pynvml.nvmlInit()
        return pynvml.nvmlSystemGetDriverVersion()
    except Exception:  # noqa: BLE001 - the driver version is informative only
        return None


class ProfileStore:
    """A profile directory being written: its metadata and one `Table` per op family."""

    def __init__(self, root: Path, meta: dict[str, Any], table_device: dict[str, Any] | None = None):
        self.root = Path(root)
        self.meta = meta
        self.table_device = table_device  # the machine of tables this run adds, when not the profile's

    @classmethod
    def open(cls, root: Path, device: str, threads: int, ops: Iterable[str] = ()) -> ProfileStore:
        """Open `root` for measuring, resuming it if it is a profile of the same device and threads.

        A run that only adds families the directory has no table of (`ops`) may come from another
        machine of the same kind and thread count: those tables record their own `device` block."""
        root = Path(root)
        fresh = machine_meta(device, threads)
        if (root / META_FILE).exists():
            meta = read_meta(root)
            old = meta["device"]
            if old.get("name") != fresh["name"] and _own_tables(meta, fresh, list(ops)):
                return cls(root, meta, table_device=fresh)
            for field in ("kind", "name", "threads"):
                if old.get(field) != fresh[field]:
                    raise ProfileError(root / META_FILE, f"device.{field}", old.get(field),
                                       f"this run measures {field} = {fresh[field]!r}; resume only the same "
                                       "device and thread count, or write to a new --out directory")
            return cls(root, meta)
        if root.exists() and any(root.iterdir()):
            raise ProfileError(root, "directory", str(root), "is not empty and holds no profile.json; "
                               "choose a new or empty --out directory")
        store = cls(root, {"format": FORMAT, "version": VERSION, "device": fresh, "tables": {}, "fits": {}})
        store.save_meta()
        return store

    def table(self, op: str) -> Table:
        return Table(self, op)

    def save_meta(self) -> None:
        write_text_atomic(self.root / META_FILE, json.dumps(self.meta, indent=2, sort_keys=False) + "\n")


def _own_tables(meta: dict[str, Any], fresh: dict[str, Any], ops: list[str]) -> bool:
    """Whether a run of `ops` on machine `fresh` may write into a profile of another machine: same
    kind and threads, and each of its tables is new or was measured on `fresh`'s machine."""
    if not ops or any(meta["device"].get(f) != fresh[f] for f in ("kind", "threads")):
        return False
    return all(op not in meta["tables"] or (meta["tables"][op].get("device") or {}).get("name") == fresh["name"]
               for op in ops)


class Table:
    """One op family's measurements: a DataFrame keyed by TABLES[op].key, saved after each row."""

    def __init__(self, store: ProfileStore, op: str):
        if op not in TABLES:
            raise ValueError(f"unknown profile table {op!r}; known: {', '.join(TABLES)}")
        self.store, self.op, self.spec = store, op, TABLES[op]
        self.path = store.root / self.spec.file
        self.rows: list[dict[str, Any]] = (
            with_added_columns(op, pd.read_csv(self.path)).to_dict("records") if self.path.exists() else []
        )
        self._keys = {self.key_of(r) for r in self.rows}

    def key_of(self, row: dict[str, Any]) -> tuple:
        return tuple(str(row[k]) for k in self.spec.key)

    def has(self, shape: dict[str, Any]) -> bool:
        return self.key_of(shape) in self._keys

    def add(self, row: dict[str, Any]) -> None:
        missing = [c for c in self.spec.columns if c not in row]
        if missing:
            raise ValueError(f"{self.op} row lacks columns {missing}: {row}")
        self.rows.append(row)
        self._keys.add(self.key_of(row))
        self.save()

    def extend(self, rows: Iterable[dict[str, Any]]) -> None:
        for row in rows:
            self.add(row)

    def frame(self) -> pd.DataFrame:
        return pd.DataFrame(self.rows, columns=list(dict.fromkeys([*self.spec.columns, *self._extra()])))

    def _extra(self) -> list[str]:
        return [c for r in self.rows for c in r if c not in self.spec.columns]

    def save(self) -> None:
        write_text_atomic(self.path, self.frame().to_csv(index=False))
        entry = {"file": self.spec.file, "rows": len(self.rows)}
        own = self.store.table_device or self.store.meta["tables"].get(self.op, {}).get("device")
        self.store.meta["tables"][self.op] = {**entry, "device": own} if own else entry
        self.store.save_meta()
