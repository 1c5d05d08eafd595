"""The engine's step loop in a background thread, fed by a thread-safe inbox.

The engine is not thread-safe, so one thread owns it: `EngineThread` drains an inbox of
`add` and `abort` messages between steps, steps while any request is unfinished, and sleeps
on the inbox otherwise (or until the next request's arrival time). Each request's
`on_output(seq)` is called from this thread after every step that advanced it and once when
it ends; the OpenAI server turns that into an asyncio queue per request.

Back-pressure: `submit` refuses a request (`QueueFull`) when `max_queue` requests already
wait to be admitted, counting those still in the inbox, so a burst is answered at once
instead of piling up unbounded. An exception inside a step is a bug, not a client's
doing: the loop ends every live request with finish reason "error", counts it, prints the
traceback, and keeps serving. A `RankFailed` (a rank of a parallel engine died) is different:
no step can run any more, so the loop ends the live requests the same way, stops the other
ranks, keeps the error in `fatal` and ends; `submit` then raises it (the server answers 503).
"""

from __future__ import annotations

import queue
import sys
import threading
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from executor.serving.engine import Engine, EngineSeq
from executor.serving.sampling import SamplingParams
from executor.serving.workers import RankFailed


class QueueFull(RuntimeError):
    """Too many requests wait already; the server answers 429."""


@dataclass
class Handle:
    """A submitted request; `seq` is set once the engine thread has queued it."""

    prompt_ids: list[int]
    params: SamplingParams
    on_output: Callable[[EngineSeq], None]
    seq: EngineSeq | None = None
    aborted: bool = False


class EngineThread:
    def __init__(self, engine: Engine, max_queue: int = 256):
        if max_queue < 1:
            raise ValueError(f"max_queue={max_queue}: must be >= 1")
        self.engine, self.max_queue = engine, max_queue
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.step_errors = 0
        self.fatal: RankFailed | None = None   # set when a rank died; the loop has ended
        self._in_inbox = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="simtune-engine", daemon=True)

    def start(self) -> EngineThread:
        self.thread.start()
        return self

    def stop(self, timeout_s: float = 10.0) -> None:
        self._stop.set()
        self.inbox.put(None)
        self.thread.join(timeout_s)

    @property
    def alive(self) -> bool:
        return self.thread.is_alive()

    @property
    def queue_length(self) -> int:
        return self.engine.num_waiting + self._in_inbox

    def submit(self, prompt_ids: Sequence[int], params: SamplingParams,
               on_output: Callable[[EngineSeq], None]) -> Handle:
        """Queue a request (RequestRejected if it can never run, QueueFull if too many wait)."""
        if self.fatal is not None:
            raise self.fatal
        ids = self.engine.check_request(prompt_ids, params)
        with self._lock:
            if self.queue_length >= self.max_queue:
                raise QueueFull(f"{self.queue_length} requests are waiting (the limit is {self.max_queue}); "
                                f"retry later")
            self._in_inbox += 1
        handle = Handle(ids, params, on_output)
        self.inbox.put(("add", handle))
        return handle

    def abort(self, handle: Handle) -> None:
        """Stop a request and free its blocks (a client that went away)."""
        handle.aborted = True
        self.inbox.put(("abort", handle))

    # --- the thread ---------------------------------------------------------------------------
    def _run(self) -> None:
        eng = self.engine
        while not self._stop.is_set():
            nxt = eng.next_arrival_s()
            runnable = not eng.scheduler.idle or (nxt is not None and nxt <= eng.now())
            self._drain(0.0 if runnable else 0.5 if nxt is None else min(0.5, max(0.0, nxt - eng.now())))
            if self._stop.is_set():
                break
            try:
                eng.step()
            except RankFailed as exc:  # a rank of a parallel engine is gone: nothing can step
                self.step_errors += 1
                self.fatal = exc
                print(f"serving engine stopped: {exc}", file=sys.stderr)
                self._end_live()
                eng.close()
                break
            except Exception:  # a bug: end what is live, keep serving
                self.step_errors += 1
                traceback.print_exc(file=sys.stderr)
                self._end_live()

    def _end_live(self) -> None:
        """End every live request with finish reason "error" (and tell its stream)."""
        eng = self.engine
        for seq in list(eng.seqs.values()):
                    notify, seq.on_output = seq.on_output, None
                    try:
                        eng.abort(seq.id)
                    except Exception:
                        traceback.print_exc(file=sys.stderr)
                    seq.finish_reason = "error"
                    if notify:
                        notify(seq)

    def _drain(self, block_s: float) -> None:
        """Apply every message in the inbox; wait up to `block_s` seconds for the first one."""
        try:
            msg = self.inbox.get(timeout=block_s) if block_s > 0 else self.inbox.get_nowait()
        except queue.Empty:
            return
        while msg is not None:
            self._apply(msg)
            try:
                msg = self.inbox.get_nowait()
            except queue.Empty:
                return

    def _apply(self, msg) -> None:
        kind, handle = msg
        if kind == "add":
            with self._lock:
                self._in_inbox -= 1
            if handle.aborted:
                return
            seq = self.engine.add_request(handle.prompt_ids, handle.params)
            seq.on_output = handle.on_output
            handle.seq = seq
        elif kind == "abort" and handle.seq is not None:
            self.engine.abort(handle.seq.id)
