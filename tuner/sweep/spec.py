"""A sweep spec and the scenarios it names: the cross product of its axes, filtered by `where`.

```yaml
command: tune train            # or simulate train|serve|gnn, tune serve|spec|gnn
options: {no_baselines: true}  # fixed for every scenario
axes:                          # one list per option; scenarios are the cross product
  model: [gpt3-1.3b, gpt3-13b, gpt3-175b]
  cluster: [8xa100-80gb, 4x8xa100-80gb]
  global_batch_size: [64, 128, 256, 512]
where: "not (model == 'gpt3-175b' and global_batch_size < 128)"   # optional
timeout_s: 600                 # optional, per scenario
```

A scenario is identified by a hash of the command, the options and its axis values, so a
resumed sweep recognises the rows it already holds, and editing one axis keeps the rows of the
scenarios it did not change.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from simulator.errors import SpecError
from tuner.sweep.commands import COMMANDS, Command, check_names
from tuner.sweep.where import Where

FIELDS = ("command", "options", "axes", "where", "timeout_s", "name")
MAX_SCENARIOS = 10_000_000


@dataclass(frozen=True)
class Scenario:
    id: str
    keys: dict[str, Any]              # the axis values: the table's key columns
    options: dict[str, Any]           # everything the command receives (fixed options + keys)


@dataclass(frozen=True)
class SweepSpec:
    command: str
    axes: dict[str, list[Any]]
    options: dict[str, Any] = field(default_factory=dict)
    where: str | None = None
    timeout_s: float | None = None
    name: str | None = None

    @property
    def cmd(self) -> Command:
        return COMMANDS[self.command]

    def to_dict(self) -> dict[str, Any]:
        out = {"name": self.name, "command": self.command, "options": self.options, "axes": self.axes,
               "where": self.where, "timeout_s": self.timeout_s}
        return {k: v for k, v in out.items() if v is not None}

    def scenarios(self) -> list[Scenario]:
        """The cross product of the axes, in axis order, minus what `where` rejects."""
        where = Where(self.where, set(self.axes) | set(self.options)) if self.where else None
        names = list(self.axes)
        out = []
        for values in itertools.product(*(self.axes[n] for n in names)):
            keys = dict(zip(names, values))
            opts = {**self.options, **keys}
            if where is not None and not where(opts):
                continue
            out.append(Scenario(scenario_id(self.command, opts), keys, opts))
        return out


def scenario_id(command: str, options: dict[str, Any]) -> str:
    blob = json.dumps({"command": command, "options": options}, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


_SCALAR = (str, int, float, bool)


def parse_sweep(data: Any, where_from: str = "sweep") -> SweepSpec:
    """Validate a sweep spec mapping; every error names the field, the value and what is allowed."""
    if not isinstance(data, dict):
        raise SpecError(where_from, type(data).__name__, "must hold a mapping with command, options, axes")
    unknown = sorted(set(data) - set(FIELDS))
    if unknown:
        raise SpecError(f"sweep.{unknown[0]}", data[unknown[0]], f"unknown field; known fields are {', '.join(FIELDS)}")
    command = data.get("command")
    if not isinstance(command, str) or command not in COMMANDS:
        raise SpecError("sweep.command", command, f"must be one of: {', '.join(COMMANDS)}")
    options, axes = data.get("options") or {}, data.get("axes")
    if not isinstance(options, dict):
        raise SpecError("sweep.options", options, "must be a mapping of option name -> value")
    if not isinstance(axes, dict) or not axes:
        raise SpecError("sweep.axes", axes, "must be a mapping of option name -> list of values, at least one")
    for name, values in axes.items():
        if not isinstance(values, list) or not values:
            raise SpecError(f"sweep.axes.{name}", values, "must be a non-empty list of values")
        bad = [v for v in values if not isinstance(v, _SCALAR) or (isinstance(v, float) and v != v)]
        if bad:
            raise SpecError(f"sweep.axes.{name}", bad[0], "values must be names, paths or numbers (not NaN)")
        if len(set(map(repr, values))) != len(values):
            raise SpecError(f"sweep.axes.{name}", values, "values must be distinct")
    both = sorted(set(options) & set(axes))
    if both:
        raise SpecError(f"sweep.options.{both[0]}", options[both[0]], "is also an axis; give it in one place")
    check_names(COMMANDS[command], [*options, *axes])
    total = 1
    for values in axes.values():
        total *= len(values)
    if total > MAX_SCENARIOS:
        raise SpecError("sweep.axes", f"{total:,} scenarios", f"at most {MAX_SCENARIOS:,} before the filter")
    where = data.get("where")
    if where is not None:
        if not isinstance(where, str) or not where.strip():
            raise SpecError("sweep.where", where, "must be an expression in a string")
        Where(where, set(axes) | set(options))  # syntax and names checked now, not per scenario
    timeout = data.get("timeout_s")
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float))
                                or not 0 < timeout < 1e7):
        raise SpecError("sweep.timeout_s", timeout, "must be a number of seconds > 0")
    name = data.get("name")
    return SweepSpec(command, {k: list(v) for k, v in axes.items()}, dict(options), where,
                     None if timeout is None else float(timeout), None if name is None else str(name))


def load_sweep(ref: str | Path | dict[str, Any]) -> SweepSpec:
    """A sweep spec from a YAML file or a mapping."""
    if isinstance(ref, dict):
        return parse_sweep(ref)
    from simulator.specs.catalog import read_yaml

    path = Path(ref)
    if not path.exists():
        raise SpecError("sweep", str(ref), "file does not exist")
    return parse_sweep(read_yaml(path), str(path))
