"""Fitting measured tables with scikit-learn, and the cross-validation every fit reports.

Every cost model here is linear in its parameters once the features are chosen from the
physics (FLOPs, FLOPs over the smallest dimension, bytes, a constant for the launch), so
one weighted non-negative least-squares fit serves them all:

    time = sum_j coef_j * feature_j          coef_j >= 0

Weights 1/time^2 make it minimise the *relative* error, so a 20 us kernel counts as much as
a 20 ms one. The error every fit reports is cross-validated over *shapes*: GroupKFold holds
out whole groups (a GEMM shape in all its passes, a collective's message size), never
single repetitions of a shape the fit has seen. `cv_median_abs_error` is the median of
|predicted / measured - 1| over the held-out rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from sklearn.linear_model import LinearRegression
from sklearn.model_selection import GroupKFold


@dataclass(frozen=True)
class LinearFit:
    """coef[name] per feature, and the held-out relative errors behind `cv_median_abs_error`."""

    coef: dict[str, float]
    cv_errors: np.ndarray
    samples: int

    @property
    def cv_median_abs_error(self) -> float | None:
        return float(np.median(self.cv_errors)) if len(self.cv_errors) else None

    def predict(self, features: pd.DataFrame) -> np.ndarray:
        return sum(self.coef[c] * features[c].to_numpy(float) for c in self.coef)

    def summary(self) -> dict[str, float | int | None]:
        return {"cv_median_abs_error": self.cv_median_abs_error, "samples": self.samples}


def _regress(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    model = LinearRegression(positive=True, fit_intercept=False)
    model.fit(x, y, sample_weight=1.0 / np.maximum(y, 1e-12) ** 2)
    return model.coef_


def fit_linear(features: pd.DataFrame, seconds: Sequence[float] | np.ndarray,
               groups: Sequence | np.ndarray | None = None, folds: int = 5) -> LinearFit:
    """Non-negative least squares of `seconds` on the columns of `features`, relative error,
    cross-validated by GroupKFold over `groups` (one group per row when None)."""
    x = features.to_numpy(float)
    y = np.asarray(seconds, dtype=float)
    if len(y) == 0:
        raise ValueError("nothing to fit: the table has no rows")
    groups = np.arange(len(y)) if groups is None else np.asarray(groups)
    coef = _regress(x, y)
    errors: list[float] = []
    n_groups = len(np.unique(groups))
    if n_groups >= 3:
        for train, test in GroupKFold(n_splits=min(folds, n_groups)).split(x, y, groups):
            c = _regress(x[train], y[train])
            errors.extend(np.abs(x[test] @ c / y[test] - 1.0))
    return LinearFit(dict(zip(features.columns, map(float, coef), strict=True)), np.asarray(errors), len(y))


def shape_groups(df: pd.DataFrame, columns: Sequence[str]) -> np.ndarray:
    """One integer group id per distinct combination of `columns` (the shape a row measures)."""
    return df.groupby(list(columns), sort=False).ngroup().to_numpy()
