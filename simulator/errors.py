"""Domain errors shared by every part of simtune.

`SpecError` is raised for input that is wrong (a field out of range, an unknown catalog
name); `InfeasiblePlan` marks a legal plan that cannot run (it does not fit in memory).
Tuners count the second kind; the first is always the user's to fix. `assert` is kept for
bugs.
"""

from __future__ import annotations

from typing import Any


class SpecError(ValueError):
    """A spec field has a value that is not allowed.

    The message always names the field, the value and what is allowed.
    """

    def __init__(self, field: str, value: Any, allowed: str):
        self.field = field
        self.value = value
        self.allowed = allowed
        super().__init__(f"{field} = {value!r}: {allowed}")


class InfeasiblePlan(Exception):
    """A plan that is valid but cannot run on the given hardware."""

    def __init__(self, reason: str):
        self.reason = reason
        super().__init__(reason)
