"""`Gen`: the future a `gen()` call returns, usable as a string.

It returns at once; any use that needs the text (str(), f-strings, +, ==, len, `in`, string
methods) waits for the call. A failed call raises `CallError` at that point of use, naming the
call (its path in the call tree) and the cause. Passing a `Gen` into another call's prompt
does not wait: the runtime starts the dependent call when its inputs are done.
"""

from __future__ import annotations

import concurrent.futures as cf
from typing import Any


class CallError(RuntimeError):
    """An LLM call failed; raised where its result is used."""

    def __init__(self, call_id: str, path: str, cause: BaseException):
        self.call_id, self.path, self.cause = call_id, path, cause
        super().__init__(f"LLM call {path} ({call_id}) failed: {type(cause).__name__}: {cause}")


class Gen:
    """The result of one LLM call: a string once done."""

    def __init__(self, call_id: str, path: str, future: cf.Future, runtime: Any = None):
        self.call_id, self.path, self._future, self.runtime = call_id, path, future, runtime

    # --- waiting ---------------------------------------------------------------------------
    def done(self) -> bool:
        return self._future.done()

    def result(self, timeout: float | None = None) -> str:
        """The completion text; waits. Raises CallError if the call failed."""
        from executor.prompts.runtime import note_waited

        note_waited(self)
        try:
            completion = self._future.result(timeout)
        except cf.TimeoutError:
            raise
        except BaseException as err:  # noqa: BLE001 - re-raised with the call's identity
            raise CallError(self.call_id, self.path, err) from err
        return completion.text

    @property
    def completion(self) -> Any:
        """The backend's full answer (text, token counts, tool calls)."""
        self.result()
        return self._future.result()

    @property
    def tool_calls(self) -> list[dict[str, Any]]:
        return list(self.completion.tool_calls)

    # --- behaving like a string ------------------------------------------------------------
    def __str__(self) -> str:
        return self.result()

    def __repr__(self) -> str:
        state = repr(self.result()) if self.done() else "pending"
        return f"Gen({self.path}: {state})"

    def __format__(self, spec: str) -> str:
        return format(self.result(), spec)

    def __eq__(self, other: object) -> bool:
        return self.result() == (str(other) if isinstance(other, Gen) else other)

    def __hash__(self) -> int:
        return hash(self.call_id)

    def __add__(self, other: Any) -> str:
        return self.result() + str(other)

    def __radd__(self, other: Any) -> str:
        return str(other) + self.result()

    def __len__(self) -> int:
        return len(self.result())

    def __contains__(self, item: str) -> bool:
        return item in self.result()

    def __iter__(self):
        return iter(self.result())

    def __getitem__(self, index):
        return self.result()[index]

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self.result(), name)  # str methods: .strip(), .split(), ...
