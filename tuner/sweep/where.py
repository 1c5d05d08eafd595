"""The `where` filter of a sweep spec: a small expression language over one scenario's values.

A spec's `where: "not (model == 'gpt3-175b' and global_batch_size < 128)"` is parsed with
Python's `ast` and evaluated by walking the tree here, never by `eval`: only the nodes below
are allowed, names resolve to the scenario's axis and option values (dotted axis names such as
`plan.tp` read as attributes), and the only calls are the functions of `FUNCTIONS` plus
`startswith`/`endswith` on strings. Anything else is a `SpecError` naming the construct, raised
when the spec is loaded, so a typo costs no scenario.
"""

from __future__ import annotations

import ast
import operator
from collections.abc import Callable, Mapping
from typing import Any

from simulator.errors import SpecError


def _devices(cluster: Any) -> int:
    from simulator.specs.catalog import load_cluster

    return load_cluster(cluster).num_devices


def _model_field(name: str) -> Callable[[Any], int]:
    def get(model: Any) -> int:
        from simulator.specs.catalog import load_model

        return getattr(load_model(model), name)

    return get


FUNCTIONS: dict[str, Callable[..., Any]] = {
    "len": len, "min": min, "max": max, "abs": abs, "int": int, "float": float, "str": str, "round": round,
    "devices": _devices,                              # devices('4x8xa100-80gb') == 32
    "layers": _model_field("num_layers"),             # layers('gpt3-13b') == 40
    "heads": _model_field("num_attention_heads"),
}
_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_COMPARE = {ast.Eq: operator.eq, ast.NotEq: operator.ne, ast.Lt: operator.lt, ast.LtE: operator.le,
            ast.Gt: operator.gt, ast.GtE: operator.ge, ast.In: lambda a, b: a in b,
            ast.NotIn: lambda a, b: a not in b}
_STR_METHODS = ("startswith", "endswith")
_MAX_POWER = 64  # `2 ** 10**9` would hang the loader


class Where:
    """A parsed filter; `Where(text)(values)` is True when the scenario is kept."""

    def __init__(self, text: str, names: set[str]):
        self.text = text
        try:
            self.tree = ast.parse(text, mode="eval")
        except SyntaxError as e:
            raise SpecError("sweep.where", text, f"is not a valid expression: {e.msg}") from None
        except (ValueError, RecursionError, MemoryError) as e:  # a NUL byte; nesting too deep to parse
            raise SpecError("sweep.where", text[:200], f"is not a valid expression: {type(e).__name__}") from None
        self._check(self.tree.body, names)

    def __call__(self, values: Mapping[str, Any]) -> bool:
        try:
            return _truth(self._eval(self.tree.body, values))
        except SpecError:
            raise
        except Exception as e:  # a type error between values, a division by zero, an unknown name
            raise SpecError("sweep.where", self.text, f"fails on {dict(values)}: {type(e).__name__}: {e}") from None

    # -- checking, once, at load time ---------------------------------------------------------

    def _fail(self, node: ast.AST, what: str) -> None:
        raise SpecError("sweep.where", self.text, f"{what} is not allowed (allowed: axis and option names, "
                        "constants, and/or/not, comparisons, + - * / // % **, lists, and the functions "
                        f"{', '.join(FUNCTIONS)}, str.startswith/endswith)")

    def _check(self, node: ast.AST, names: set[str]) -> None:
        if isinstance(node, ast.Name):
            if node.id not in names and node.id not in ("True", "False", "None"):
                raise SpecError("sweep.where", self.text, f"unknown name {node.id!r}; the names are "
                                f"{', '.join(sorted(names))}")
            return
        if isinstance(node, ast.Attribute):
            dotted = _dotted(node)
            if dotted is None or dotted not in names:
                self._fail(node, f"attribute {ast.unparse(node)!r}")
            return
        if isinstance(node, ast.Call):
            f = node.func
            ok = (isinstance(f, ast.Name) and f.id in FUNCTIONS) or (
                isinstance(f, ast.Attribute) and f.attr in _STR_METHODS)
            if not ok or node.keywords:
                self._fail(node, f"the call {ast.unparse(node)!r}")
            if isinstance(f, ast.Attribute):
                self._check(f.value, names)
            for a in node.args:
                self._check(a, names)
            return
        allowed = (ast.BoolOp, ast.UnaryOp, ast.BinOp, ast.Compare, ast.Constant, ast.List, ast.Tuple,
                   ast.IfExp, ast.And, ast.Or, ast.Not, ast.USub, ast.UAdd, ast.Load, *_BINARY, *_COMPARE)
        if not isinstance(node, allowed):
            self._fail(node, f"{type(node).__name__} ({ast.unparse(node)!r})")
        for child in ast.iter_child_nodes(node):
            self._check(child, names)

    # -- evaluation ---------------------------------------------------------------------------

    def _eval(self, node: ast.AST, env: Mapping[str, Any]) -> Any:
        ev = self._eval
        if isinstance(node, ast.Constant):
            return node.value
        if isinstance(node, ast.Name):
            return {"True": True, "False": False, "None": None}.get(node.id) if node.id not in env else env[node.id]
        if isinstance(node, ast.Attribute):
            return env[_dotted(node)]
        if isinstance(node, ast.BoolOp):
            if isinstance(node.op, ast.And):
                return all(ev(v, env) for v in node.values)
            return any(ev(v, env) for v in node.values)
        if isinstance(node, ast.UnaryOp):
            v = ev(node.operand, env)
            return not v if isinstance(node.op, ast.Not) else (-v if isinstance(node.op, ast.USub) else +v)
        if isinstance(node, ast.BinOp):
            left, right = ev(node.left, env), ev(node.right, env)
            if isinstance(node.op, ast.Pow) and abs(right) > _MAX_POWER:
                raise ValueError(f"exponent {right} is larger than {_MAX_POWER}")
            return _BINARY[type(node.op)](left, right)
        if isinstance(node, ast.Compare):
            left = ev(node.left, env)
            for op, comp in zip(node.ops, node.comparators):
                right = ev(comp, env)
                if not _COMPARE[type(op)](left, right):
                    return False
                left = right
            return True
        if isinstance(node, (ast.List, ast.Tuple)):
            return [ev(e, env) for e in node.elts]
        if isinstance(node, ast.IfExp):
            return ev(node.body, env) if ev(node.test, env) else ev(node.orelse, env)
        if isinstance(node, ast.Call):
            args = [ev(a, env) for a in node.args]
            if isinstance(node.func, ast.Name):
                return FUNCTIONS[node.func.id](*args)
            target = ev(node.func.value, env)
            if not isinstance(target, str):
                raise TypeError(f"{node.func.attr} needs a string, not {type(target).__name__}")
            return getattr(target, node.func.attr)(*args)
        raise AssertionError(f"unchecked node {type(node).__name__}")  # _check admits nothing else


def _truth(value: Any) -> bool:
    if hasattr(value, "__len__") and not isinstance(value, (str, list)):
        raise TypeError(f"the filter gives {type(value).__name__}, not a truth value")
    return bool(value)


def _dotted(node: ast.AST) -> str | None:
    """`plan.tp` for Attribute(Name('plan'), 'tp'); None for anything that is not a dotted name."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    return ".".join([node.id, *reversed(parts)])
