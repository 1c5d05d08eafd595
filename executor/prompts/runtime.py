"""The runtime: runs each `gen()` call as soon as its inputs are done, many at once.

A call's inputs are the futures in its prompt and the results the program had already read
when it issued the call (program order). When all are done it goes to its backend's thread
pool, which has `max_concurrency` threads (the backend's; no other cap), so independent calls
overlap and a dependent one waits only for what it reads. Waiting never holds a pool thread,
so a chain of calls cannot starve the pool.

The runtime keeps the call tree: each prompt-function invocation has an id and a path
("main/summarize[0]/chunk[3]"), each call a path below it (".../gen[1]"), which is what a
strict replay matches. With a `TraceWriter` every function and call is written as it happens.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextvars
import itertools
import threading
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from executor.prompts.backends import Backend, CallRequest, Completion
from executor.prompts.future import Gen
from executor.prompts.trace import TraceWriter, call_key


@dataclass
class Frame:
    """One prompt-function invocation: its id, path and counters for its children's names."""

    id: str
    path: str
    counters: dict[str, int] = field(default_factory=lambda: defaultdict(int))

    def child(self, name: str) -> str:
        n = self.counters[name]
        self.counters[name] += 1
        return f"{self.path}/{name}[{n}]"


_frame: contextvars.ContextVar[Frame | None] = contextvars.ContextVar("simtune_prompt_frame", default=None)


def note_waited(gen: Gen) -> None:
    """The program read `gen`'s result: later calls from this flow of control depend on it."""
    if gen.runtime is not None:
        read = gen.runtime._read
        seen = read.get()
        if gen.call_id not in seen:
            read.set(seen | {gen.call_id})


class Runtime:
    """Dispatches calls to a backend with dependency tracking, tracing and a call tree."""

    def __init__(self, backend: Backend, trace: TraceWriter | str | None = None,
                 max_concurrency: int | None = None):
        limit = max_concurrency or backend.max_concurrency
        if limit < 1:
            raise ValueError(f"max_concurrency = {limit}: must be >= 1")
        self.backend, self.max_concurrency = backend, limit
        self.trace = TraceWriter(trace, backend.name) if isinstance(trace, str) else trace
        self._pool = cf.ThreadPoolExecutor(max_workers=limit, thread_name_prefix="simtune-llm")
        self._ids = itertools.count(1)
        self._fids = itertools.count(1)
        self._lock = threading.Lock()
        self.in_flight = 0
        self.peak_in_flight = 0
        self.calls: list[Gen] = []
        self.root = Frame("f0", "main")  # the program itself: paths restart with each runtime
        # the results this flow of control has read (program order), per runtime
        self._read: contextvars.ContextVar[frozenset[str]] = contextvars.ContextVar(
            f"simtune_results_read_{id(self)}", default=frozenset())

    # --- the call tree ---------------------------------------------------------------------
    def frame(self) -> Frame:
        return _frame.get() or self.root

    def enter(self, name: str) -> tuple[Frame, contextvars.Token]:
        parent = self.frame()
        frame = Frame(f"f{next(self._fids)}", parent.child(name))
        if self.trace:
            self.trace.write({"type": "function", "id": frame.id, "parent": parent.id, "name": name,
                              "path": frame.path, "start": self.trace.now()})
        return frame, _frame.set(frame)

    def leave(self, frame: Frame, token: contextvars.Token) -> None:
        _frame.reset(token)
        if self.trace:
            self.trace.write({"type": "function_end", "id": frame.id, "end": self.trace.now()})

    # --- calls ---------------------------------------------------------------------------------
    def submit(self, messages: list[Any], request: CallRequest, inputs: list[Gen]) -> Gen:
        """Issue a call whose `messages` (Message objects) may hold futures; returns at once."""
        frame = self.frame()
        call_id = f"c{next(self._ids)}"
        path = frame.child("gen")
        deps = {g.call_id: g for g in inputs}
        read = self._read.get()
        result: cf.Future[Completion] = cf.Future()
        gen = Gen(call_id, path, result, self)
        submitted = self.trace.now() if self.trace else 0.0
        with self._lock:
            self.calls.append(gen)

        def start(_: Any = None) -> None:
            failed = next((g for g in deps.values() if g._future.exception() is not None), None)
            if failed is not None:
                cause = failed._future.exception()
                result.set_exception(RuntimeError(f"its input call {failed.path} failed: "
                                                  f"{type(cause).__name__}: {cause}"))
                self._end(call_id, None, None, result.exception())
                return
            rendered = [m.render() for m in messages]
            req = CallRequest(rendered, request.max_tokens, request.temperature, request.top_p, request.stop,
                              request.seed, request.tools, request.model, path)
            if self.trace:
                self.trace.write({"type": "call_start", "id": call_id, "function": frame.id, "path": path,
                                  "key": call_key(rendered, req.params()), "messages": rendered,
                                  "params": req.params(), "deps": sorted(set(deps) | read), "submitted": submitted})
            try:
                self._pool.submit(self._run, call_id, req, result)
            except RuntimeError as err:  # the runtime was shut down
                result.set_exception(err)

        pending = [g for g in deps.values() if not g.done()]
        if not pending:
            start()
        else:
            remaining = [len(pending)]
            lock = threading.Lock()

            def one_done(_: Any) -> None:
                with lock:
                    remaining[0] -= 1
                    last = remaining[0] == 0
                if last:
                    start()

            for g in pending:
                g._future.add_done_callback(one_done)
        return gen

    def _run(self, call_id: str, request: CallRequest, result: cf.Future) -> None:
        started = self.trace.now() if self.trace else 0.0
        with self._lock:
            self.in_flight += 1
            self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
        try:
            completion = self.backend.complete(request)
        except BaseException as err:  # noqa: BLE001 - surfaces at the point of use
            self._end(call_id, started, None, err)
            result.set_exception(err)
            return
        finally:
            with self._lock:
                self.in_flight -= 1
        self._end(call_id, started, completion, None)
        result.set_result(completion)

    def _end(self, call_id: str, started: float | None, completion: Completion | None,
             error: BaseException | None) -> None:
        if not self.trace:
            return
        rec: dict[str, Any] = {"type": "call", "id": call_id, "started": started, "ended": self.trace.now(),
                               "error": None if error is None else f"{type(error).__name__}: {error}"}
        if completion is not None:
            rec.update(response=completion.text, prompt_tokens=completion.prompt_tokens,
                       completion_tokens=completion.completion_tokens, tool_calls=completion.tool_calls,
                       backend=completion.backend, simulated=completion.simulated)
        self.trace.write(rec)

    def tool_record(self, record: dict[str, Any]) -> None:
        if self.trace:
            self.trace.write({"type": "tool", "function": self.frame().id, **record})

    def now(self) -> float:
        return self.trace.now() if self.trace else 0.0

    # --- the end -----------------------------------------------------------------------------
    def wait(self) -> None:
        """Wait for every call issued so far (a call nobody reads still completes and is traced)."""
        while True:
            with self._lock:
                pending = [g._future for g in self.calls if not g.done()]
            if not pending:
                return
            cf.wait(pending)

    def close(self) -> None:
        self.wait()
        self._pool.shutdown(wait=True)
        if self.trace:
            self.trace.close()
        self.backend.close()

    def __enter__(self) -> Runtime:
        activate(self)
        return self

    def __exit__(self, *exc: Any) -> None:
        try:
            self.close()
        finally:
            deactivate(self)


_active: list[Runtime] = []
_active_lock = threading.Lock()


def activate(runtime: Runtime) -> None:
    with _active_lock:
        _active.append(runtime)


def deactivate(runtime: Runtime) -> None:
    with _active_lock:
        if runtime in _active:
            _active.remove(runtime)


def current_runtime() -> Runtime:
    """The innermost `with Runtime(...)`, or one on the environment's backend, made once."""
    with _active_lock:
        if _active:
            return _active[-1]
    global _default
    with _active_lock:
        if _default is None:
            from executor.prompts.backends import backend_from_env

            _default = Runtime(backend_from_env())
        return _default


_default: Runtime | None = None
