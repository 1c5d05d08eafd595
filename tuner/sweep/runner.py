"""Running a sweep: scenarios -> chunks -> a backend (this process, a process pool, Ray) -> rows
-> one Parquet table, flushed as rows arrive.

```
spec.scenarios() - done (--resume)  ->  chunks of a few scenarios
      -> serial | ProcessPoolExecutor (spawn) | Ray tasks      (the same `run_chunk` everywhere)
      -> rows {scenario_id, <axis columns>, status, message, seconds, <report columns>}
      -> SweepTable: results.parquet rewritten atomically every flush_every_s and at the end
```

A scenario never fails the sweep: `run_scenario` turns every outcome into a row whose `status`
is one of STATUSES (a report that does not fit is `infeasible`, a bad spec `spec_error`, any
other exception `error`, a scenario past `timeout_s` `timeout`). Scenarios are sent in chunks
so that a pool or Ray pays its per-task cost once per chunk, not per scenario.
"""

from __future__ import annotations

import math
import os
import signal
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from simulator.errors import InfeasiblePlan, SpecError
from tuner.sweep.spec import Scenario, SweepSpec
from tuner.sweep.table import SweepTable, flatten

STATUSES = ("ok", "infeasible", "spec_error", "error", "timeout")
RETRIED_ON_RESUME = ("error", "timeout")  # may pass on another try; the other statuses would repeat
Progress = Callable[[int, int], None]


class ScenarioTimeout(Exception):
    pass


def _alarm(signum: int, frame: Any) -> None:
    raise ScenarioTimeout()


def run_scenario(command: str, options: dict[str, Any], timeout_s: float | None = None) -> dict[str, Any]:
    """One scenario -> {status, message, seconds, <flattened report>}; never raises."""
    from tuner.sweep.commands import COMMANDS

    # A timer signal interrupts the scenario; only the main thread receives signals, so a
    # scenario run from another thread has no timeout.
    timed = timeout_s is not None and hasattr(signal, "setitimer") and _main_thread()
    start = time.perf_counter()
    row: dict[str, Any] = {"status": "ok", "message": None}
    try:
        if timed:
            previous = signal.signal(signal.SIGALRM, _alarm)
            signal.setitimer(signal.ITIMER_REAL, timeout_s)
        try:
            data = COMMANDS[command].run(options)
        finally:
            if timed:
                signal.setitimer(signal.ITIMER_REAL, 0)
                signal.signal(signal.SIGALRM, previous)
        if data.get("feasible") is False:
            row.update(status="infeasible", message=data.get("infeasible_reason"))
        row.update(flatten(data))
    except ScenarioTimeout:
        row.update(status="timeout", message=f"took longer than timeout_s = {timeout_s:g}")
    except InfeasiblePlan as e:
        row.update(status="infeasible", message=str(e))
    except (SpecError, FileNotFoundError) as e:
        row.update(status="spec_error", message=str(e))
    except Exception as e:  # the sweep goes on; the row says what broke
        row.update(status="error", message=f"{type(e).__name__}: {e}")
    row["seconds"] = time.perf_counter() - start
    return row


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def run_chunk(command: str, items: list[tuple[str, dict[str, Any], dict[str, Any]]],
              timeout_s: float | None) -> list[dict[str, Any]]:
    """Scenarios (id, keys, options) -> rows. The unit of work of every backend."""
    rows = []
    for sid, keys, options in items:
        result = run_scenario(command, options, timeout_s)
        clash = {f"report.{k}" if k in keys else k: v for k, v in result.items()}
        rows.append({"scenario_id": sid, **keys, **clash})
    return rows


# --- backends: each yields lists of rows as chunks finish ------------------------------------


Chunk = list[tuple[str, dict[str, Any], dict[str, Any]]]


def _serial(command: str, chunks: list[Chunk], timeout_s: float | None, workers: int) -> Iterator[list[dict]]:
    for chunk in chunks:
        yield run_chunk(command, chunk, timeout_s)


def _pool(command: str, chunks: list[Chunk], timeout_s: float | None, workers: int) -> Iterator[list[dict]]:
    import multiprocessing

    # spawn: workers start clean (no forked locks or simpy state), as on macOS and Windows.
    with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        pending = {pool.submit(run_chunk, command, c, timeout_s) for c in chunks}
        try:
            while pending:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    yield future.result()
        finally:
            for future in pending:
                future.cancel()


@dataclass
class RayBackend:
    """Ray tasks on a cluster at `address` ('cluster': the one this machine belongs to), or on a
    local one started for the run ('auto'). Every node needs simtune installed, and the YAML
    paths a sweep names readable at the same path (workers load the specs).

    The local one listens on 127.0.0.1 only and keeps its files in a temporary folder."""

    address: str

    def __call__(self, command: str, chunks: list[Chunk], timeout_s: float | None,
                 workers: int) -> Iterator[list[dict]]:
        tmp = _local_ray_folder()
        with _ray_env(tmp, self.address):
            import ray  # after _ray_env: Ray reads the loopback switch when it is first imported

            _forget_ray_token()
            if self.address == "auto":
                ray.init(address="local", num_cpus=workers, include_dashboard=False, _temp_dir=tmp,
                         _node_ip_address="127.0.0.1", log_to_driver=False, configure_logging=False)
            else:  # 'cluster': the one this machine belongs to (RAY_ADDRESS, or a head running here)
                address = "auto" if self.address == "cluster" else self.address
                ray.init(address=address, log_to_driver=False, configure_logging=False)
            try:
                task = ray.remote(num_cpus=1, max_retries=0)(run_chunk)
                pending = [task.remote(command, c, timeout_s) for c in chunks]
                while pending:
                    done, pending = ray.wait(pending, num_returns=1)
                    yield ray.get(done[0])
            finally:
                ray.shutdown()


def _forget_ray_token() -> None:
    """Ray caches the auth token it read first for the life of the process; an earlier sweep on
    another cluster (another token) would make this one's connection fail. Ray releases without
    token authentication have no cache to reset."""
    try:
        from ray._raylet import AuthenticationTokenLoader

        AuthenticationTokenLoader.instance().reset_cache()
    except (ImportError, AttributeError):
        pass


_RAY_FOLDER: list[str] = []


def _local_ray_folder() -> str:
    """One temporary folder per process for local Ray instances, removed when the process exits.

    Ray keeps its auth token (under HOME) for the life of the process: a second local instance
    in a folder of its own would not find the token the first one left, and would not start."""
    if not _RAY_FOLDER:
        import atexit
        import shutil
        import tempfile

        _RAY_FOLDER.append(tempfile.mkdtemp(prefix="simtune-ray-"))
        atexit.register(shutil.rmtree, _RAY_FOLDER[0], True)
    return _RAY_FOLDER[0]


@contextmanager
def _ray_env(folder: str, address: str) -> Iterator[None]:
    """The environment Ray runs in. A local instance ('auto') keeps HOME in `folder` (Ray writes
    its auth token and state under HOME). For it, and for a cluster on this machine's loopback
    address, Ray's switch for single-machine instances is on: its servers bind 127.0.0.1 (its C++
    servers read the switch too), and a driver does not swap 127.0.0.1 for the machine's external
    address. A driver joining a cluster keeps the user's token and RAY_AUTH_MODE."""
    changes = {"HOME": folder} if address == "auto" else {}
    if address == "auto" or address.split(":")[0] in ("127.0.0.1", "localhost"):
        changes["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    before = {k: os.environ.get(k) for k in changes}
    os.environ.update(changes)
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# --- the sweep -------------------------------------------------------------------------------


@dataclass
class SweepResult:
    table_path: Path
    scenarios: int
    ran: int
    skipped: int
    seconds: float
    status: dict[str, int] = field(default_factory=dict)
    backend: str = "serial"

    @property
    def scenarios_per_s(self) -> float:
        return self.ran / self.seconds if self.seconds > 0 else math.nan

    def to_dict(self) -> dict[str, Any]:
        return {"table": str(self.table_path), "scenarios": self.scenarios, "ran": self.ran,
                "skipped": self.skipped, "status": self.status, "seconds": self.seconds,
                "scenarios_per_s": self.scenarios_per_s, "backend": self.backend}


def chunk_size(n: int, workers: int) -> int:
    """About eight chunks per worker (so a slow chunk does not idle the others), 1-32 scenarios each."""
    return max(1, min(32, n // max(1, workers * 8)))


def run_sweep(spec: SweepSpec, out_dir: str | Path, *, workers: int | None = None, ray: str | None = None,
              resume: bool = False, progress: Progress | None = None, flush_every_s: float = 2.0,
              chunk: int | None = None) -> SweepResult:
    """Run every scenario of `spec` not already done, writing `out_dir`/results.parquet as rows arrive.

    `workers`: 1 runs in this process; more (default: the CPU count) on a spawn process pool, or
    with `ray` on Ray tasks. Raises SpecError if `out_dir` holds a sweep and `resume` is False.
    """
    workers = workers or os.cpu_count() or 1
    table = SweepTable(Path(out_dir), spec)
    if table.exists() and not resume:
        raise SpecError("--out", str(out_dir), "already holds a sweep table; pass --resume to continue it, "
                        "or choose another folder")
    scenarios = spec.scenarios()
    done = table.load(keep={s.id for s in scenarios}, retry=RETRIED_ON_RESUME) if resume else set()
    todo: list[Scenario] = [s for s in scenarios if s.id not in done]
    size = chunk or chunk_size(len(todo), workers)
    chunks = [[(s.id, s.keys, s.options) for s in todo[i:i + size]] for i in range(0, len(todo), size)]
    backend, name = (_serial, "serial") if workers == 1 and ray is None else (_pool, f"pool of {workers}")
    if ray is not None:
        backend, name = RayBackend(ray), f"ray ({ray}, {workers} workers)" if ray == "auto" else f"ray ({ray})"
    table.write_spec()
    start = last_flush = time.perf_counter()
    ran = 0
    if progress:
        progress(0, len(todo))
    try:
        for rows in backend(spec.command, chunks, spec.timeout_s, workers) if chunks else ():
            table.add(rows)
            ran += len(rows)
            if time.perf_counter() - last_flush >= flush_every_s:
                table.flush()
                last_flush = time.perf_counter()
            if progress:
                progress(ran, len(todo))
    finally:
        table.flush()
    seconds = time.perf_counter() - start
    counts = Counter(table.frame()["status"]) if len(table) else Counter()
    status = {s: int(counts.get(s, 0)) for s in STATUSES}
    return SweepResult(table.path, len(scenarios), ran, len(scenarios) - len(todo), seconds, status, name)
