"""Base class of every spec: frozen pydantic models whose errors name field, value and rule.

pydantic does the type coercion from YAML; `Spec.parse` turns its ValidationError into a
`SpecError` whose message reads `model.num_layers = -3: must be > 0`.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, ClassVar, Self

from pydantic import BaseModel, ConfigDict, ValidationError

from simulator.errors import SpecError


def _model_at(cls: type[BaseModel], path: tuple) -> type[BaseModel]:
    """The (nested) model class that validates the mapping at `path` of a ValidationError."""
    for part in path:
        if not isinstance(part, str) or part not in cls.model_fields:
            continue  # a list index, or a union member's tag
        candidates = [cls.model_fields[part].annotation]
        while candidates:
            t = candidates.pop()
            if isinstance(t, type) and issubclass(t, BaseModel):
                cls = t
                break
            candidates.extend(getattr(t, "__args__", ()))
    return cls


INT64_MAX = 2**63 - 1


def _beyond_int64(data: Any, path: tuple = (), depth: int = 0) -> tuple[tuple, int] | None:
    """The location and value of the first integer in `data` that 64 bits cannot hold (numpy
    would overflow on it deep inside a simulation), or None. Specs nest a few levels; deeper
    input is left to pydantic, which rejects it."""
    if isinstance(data, int) and not isinstance(data, bool):
        return (path, data) if abs(data) > INT64_MAX else None
    if depth > 8 or not isinstance(data, (dict, list)):
        return None
    for key, value in data.items() if isinstance(data, dict) else enumerate(data):
        found = _beyond_int64(value, (*path, key), depth + 1)
        if found:
            return found
    return None


class Spec(BaseModel):
    """A frozen, validated spec. Unknown fields are rejected, and so are non-finite numbers
    (NaN, infinities) and integers beyond 64 bits, which would otherwise surface as NaN reports
    or overflows deep inside a simulation."""

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True, allow_inf_nan=False)

    kind: ClassVar[str] = "spec"  # overridden by subclasses; used as the prefix of error field names

    @classmethod
    def parse(cls, data: dict[str, Any], prefix: str | None = None) -> Self:
        """Validate `data`; raise SpecError naming the first bad field."""
        if not isinstance(data, dict):
            raise SpecError(prefix or cls.__name__, data, "must be a mapping of fields")
        huge = _beyond_int64(data)
        if huge:
            loc, value = huge
            field = ".".join(str(p) for p in (prefix or cls.kind, *loc))
            raise SpecError(field, value, f"must be an integer of at most 64 bits (|value| <= {INT64_MAX:,})")
        try:
            return cls.model_validate(data)
        except ValidationError as err:
            first = err.errors()[0]
            loc = ".".join(str(p) for p in first["loc"] if p != "__root__")
            field = ".".join(p for p in (prefix or cls.kind, loc) if p)
            value = first.get("input")
            msg = first["msg"]
            if first["type"] == "extra_forbidden":
                allowed = sorted(_model_at(cls, first["loc"][:-1]).model_fields)
                msg = f"unknown field; known fields are {', '.join(allowed)}"
            elif msg.startswith("Value error, "):
                msg = msg[len("Value error, ") :]
                # A whole-spec rule names its field first: "global_batch_size: must be ..."
                name, sep, rest = msg.partition(": ")
                if sep and name.isidentifier() and isinstance(value, dict):
                    field, msg = f"{field}.{name}", rest
                    default = cls.model_fields[name].default if name in cls.model_fields else None
                    value = value.get(name, default)
            if isinstance(value, dict) and first["type"] == "missing":
                value = None
                msg = "is required"
            raise SpecError(field, value, msg) from None

    def to_dict(self) -> dict[str, Any]:
        """Plain data, in the schema `parse` reads back."""
        return self.model_dump(mode="json", exclude_none=True, by_alias=True)

    def spec_hash(self) -> str:
        """Stable hash of the content, for caches."""
        blob = json.dumps(self.to_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]
