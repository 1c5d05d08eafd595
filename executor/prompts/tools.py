"""Tools: Python functions described to the model by their signature and docstring.

`Tool.of(fn).schema()` is the OpenAI tools schema ({"type": "function", "function": {name,
description, parameters}}), the parameters a JSON schema built from the type hints (str,
int, float, bool, lists and dicts of them, Literal, Optional); parameters without a default
are required. `call_tool` (executor.prompts.function) runs one and traces it.
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

_JSON = {str: "string", int: "integer", float: "number", bool: "boolean", dict: "object", list: "array"}


def json_schema(annotation: Any) -> dict[str, Any]:
    """The JSON schema of a type hint; refuses what JSON cannot carry."""
    if annotation is inspect.Parameter.empty or annotation is Any:
        return {}
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Literal:
        return {"enum": list(args)}
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        inner = [a for a in args if a is not type(None)]
        return json_schema(inner[0]) if len(inner) == 1 else {"anyOf": [json_schema(a) for a in inner]}
    if origin in (list, tuple, set):
        return {"type": "array", **({"items": json_schema(args[0])} if args else {})}
    if origin is dict:
        return {"type": "object"}
    if annotation in _JSON:
        return {"type": _JSON[annotation]}
    raise TypeError(f"tool parameter type {annotation!r}: not expressible as JSON "
                    f"(use {', '.join(t.__name__ for t in _JSON)}, Literal, Optional or lists of them)")


@dataclass(frozen=True)
class Tool:
    fn: Callable[..., Any]
    name: str
    description: str

    @classmethod
    def of(cls, tool: Any) -> Tool:
        if isinstance(tool, Tool):
            return tool
        if not callable(tool):
            raise TypeError(f"tool {tool!r}: must be a function or a Tool")
        doc = inspect.getdoc(tool) or ""
        return cls(tool, tool.__name__, doc.split("\n\n")[0].strip())

    def schema(self) -> dict[str, Any]:
        hints = typing.get_type_hints(self.fn)
        properties, required = {}, []
        for name, param in inspect.signature(self.fn).parameters.items():
            if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
                continue
            properties[name] = json_schema(hints.get(name, param.annotation))
            if param.default is inspect.Parameter.empty:
                required.append(name)
        return {"type": "function", "function": {
            "name": self.name, "description": self.description,
            "parameters": {"type": "object", "properties": properties, "required": required}}}


def tool(fn: Callable[..., Any]) -> Tool:
    """Decorator form of `Tool.of`."""
    return Tool.of(fn)
