"""Compile the symbolic cost expressions once into one vectorized numpy function.

`sympy.lambdify` with common-subexpression elimination turns the whole expression table into
a single function of all symbols; every argument may be a scalar or a numpy array, so one call
evaluates a whole grid of candidate plans (the tuner's inner loop).
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import cache

import numpy as np
import sympy as sp

from simulator.costs.symbols import ALL_SYMBOLS
from simulator.costs.transformer import EXPRESSIONS


class CompiledCosts:
    """All expressions of `transformer.EXPRESSIONS`, compiled to numpy."""

    def __init__(self, expressions: Mapping[str, sp.Expr] = EXPRESSIONS):
        self.names = list(expressions)
        self._fn = sp.lambdify(ALL_SYMBOLS, [expressions[n] for n in self.names], "numpy", cse=True)
        self._symbol_names = [sym.name for sym in ALL_SYMBOLS]

    def __call__(self, values: Mapping[str, float | np.ndarray]) -> dict[str, np.ndarray]:
        """Evaluate every expression. Missing symbols default to 0 (e.g. k, offloads)."""
        unknown = set(values) - set(self._symbol_names)
        if unknown:
            raise KeyError(f"unknown cost symbols: {sorted(unknown)}")
        args = [values.get(n, 0.0) for n in self._symbol_names]
        out = self._fn(*args)
        shape = np.broadcast_shapes(*(np.shape(x) for x in args))
        return {n: np.broadcast_to(np.asarray(v, dtype=float), shape) for n, v in zip(self.names, out)}


@cache
def compiled_costs() -> CompiledCosts:
    """The process-wide compiled cost model (compiled on first use)."""
    return CompiledCosts()
