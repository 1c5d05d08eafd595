"""The sweep's results table: one row per scenario, kept as Parquet in the sweep's folder.

```
OUT/sweep.yaml        the spec the table was made from (read by `simtune sweep --report OUT`)
OUT/results.parquet   scenario_id, the axis columns, status, message, seconds, then the report's
                      fields flattened: `breakdown.compute`, `ttft_s.p99`, `report.plan.tp`, ...
```

Both are replaced atomically (written beside the target, then `os.replace`), so a sweep that is
killed leaves the last complete table, never half of one. Lists in reports (per-stage rows,
per-request latencies) are left out; their summaries are already fields.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pandas as pd

from simulator.errors import SpecError
from simulator.files import atomic_path, write_text_atomic

MAX_DEPTH = 4
DROPPED = ("cost_sources",)  # per-cost provenance strings: the same for every row of a cluster


def flatten(data: dict[str, Any], prefix: str = "", depth: int = 0) -> dict[str, Any]:
    """Nested report dicts -> {'a.b.c': scalar}; lists and deeper levels are left out."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        if key in DROPPED:
            continue
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            if depth + 1 < MAX_DEPTH:
                out.update(flatten(value, name + ".", depth + 1))
        elif value is None or isinstance(value, (str, int, float, bool)):
            out[name] = value
        elif hasattr(value, "item"):  # numpy scalar
            out[name] = value.item()
    return out


class SweepTable:
    """The rows so far, and their Parquet file."""

    def __init__(self, out_dir: Path, spec: Any):
        self.dir, self.spec = Path(out_dir), spec
        self.path = self.dir / "results.parquet"
        self.rows: list[dict[str, Any]] = []
        self._frame: pd.DataFrame | None = None

    def __len__(self) -> int:
        return len(self.rows)

    def exists(self) -> bool:
        return self.path.exists()

    def load(self, keep: set[str], retry: tuple[str, ...]) -> set[str]:
        """Rows of an earlier run that belong to `keep`; returns the ids that need no new run."""
        if not self.exists():
            return set()
        old = pd.read_parquet(self.path)
        old = old[old["scenario_id"].isin(keep) & ~old["status"].isin(retry)]
        self.rows = [{k: v for k, v in r.items() if not _missing(v)} for r in old.to_dict("records")]
        self._frame = None
        return set(old["scenario_id"])

    def add(self, rows: list[dict[str, Any]]) -> None:
        self.rows.extend(rows)
        self._frame = None

    def frame(self) -> pd.DataFrame:
        if self._frame is None:
            self._frame = to_frame(self.rows)
        return self._frame

    def write_spec(self) -> None:
        import yaml

        with _writing(self.dir / "sweep.yaml"):
            write_text_atomic(self.dir / "sweep.yaml", yaml.safe_dump(self.spec.to_dict(), sort_keys=False))

    def flush(self) -> None:
        if self.rows:
            with _writing(self.path):
                write_parquet_atomic(self.frame(), self.path)


@contextmanager
def _writing(path: Path) -> Iterator[None]:
    """An unwritable folder or a full disk is the user's to fix: a SpecError naming the path (the
    temporary file is gone and the last complete table, if any, is still in place)."""
    try:
        yield
    except OSError as e:
        raise SpecError("--out", str(path.parent), f"cannot write {path.name}: {e.strerror or e}") from None


def _missing(v: Any) -> bool:
    return v is None or (isinstance(v, float) and v != v)


def to_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """Rows -> a table whose columns each hold one type (Parquet needs it): a column mixing
    numbers and text, e.g. an axis of `plan.dp: [2, auto]`, is stored as text."""
    df = pd.DataFrame(rows)
    for col in df.columns:
        if df[col].dtype == object:
            kinds = {type(v) for v in df[col] if not _missing(v)}
            if len(kinds) > 1 and not kinds <= {int, float}:
                df[col] = df[col].map(lambda v: None if _missing(v) else str(v))
    return df


def write_parquet_atomic(df: pd.DataFrame, path: Path) -> None:
    """The table to `path` through a temporary file beside it and os.replace."""
    with atomic_path(path) as tmp:
        df.to_parquet(tmp, index=False)


def read_sweep(out_dir: str | Path) -> tuple[Any, pd.DataFrame]:
    """(spec, table) of a sweep folder."""
    from tuner.sweep.spec import load_sweep

    out_dir = Path(out_dir)
    return load_sweep(out_dir / "sweep.yaml"), pd.read_parquet(out_dir / "results.parquet")
