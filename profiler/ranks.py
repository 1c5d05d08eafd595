"""Real torch.distributed ranks on this machine: spawn N processes, run a function, collect results.

`run_ranks` is the one way this project starts ranks: the collective benchmark
(`profiler/collectives.py`) measures through it, distributed tests spawn gloo ranks on the
CPU through it, and the training executor is to launch its local workers through it.

    parent                               rank r (a fresh "spawn" process)
    ------                               --------------------------------
    port = a free port on 127.0.0.1      MASTER_ADDR/PORT, RANK, WORLD_SIZE (+ GLOO_SOCKET_IFNAME=lo)
    start N processes, one pipe each     keep_freed_memory (executor/allocator.py);
                                         torch.set_num_threads(threads); nccl: cuda:r
    wait on pipes and process exits      init_process_group(backend, timeout)
      until every rank answered,         result = fn(r, world_size, *args)
      one failed, or the deadline        barrier, destroy_process_group
    stop what is left, by PID            send ("ok", result) or ("error", time, traceback)
    return [result of rank 0, 1, ...]    (an error is sent before the teardown, which may hang)

Why a pipe per rank and `multiprocessing.connection.wait`: the parent blocks on results and
on process exits at once, so a rank that dies without a word (segfault, OOM kill) is
noticed at once, and a deadline bounds every wait. When a rank fails, its peers usually
fail next (a closed connection in the middle of a collective); the parent waits a short
grace for them and reports the *earliest* failure, with the later ones listed after it.

The port comes from binding port 0 and closing the socket, so another process could take it
before rank 0 listens on it; that race is rare on a test machine and fails loudly (rank 0's
store cannot bind), never silently.
"""

from __future__ import annotations

import os
import pickle
import socket
import time
import traceback
from collections.abc import Callable, Sequence
from datetime import timedelta
from multiprocessing.connection import Connection, wait
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from executor.allocator import keep_freed_memory

BACKENDS = ("gloo", "nccl")
ERROR_GRACE_S = 3.0  # how long the peers of a failed rank get to report their own failure
STOP_GRACE_S = 2.0  # SIGTERM, then SIGKILL after this


class RankError(RuntimeError):
    """A rank raised (or died): names the rank and carries its traceback text."""

    def __init__(self, rank: int, world_size: int, detail: str, others: Sequence[str] = ()):
        self.rank, self.world_size, self.detail = rank, world_size, detail
        also = "".join(f"\n  also: {line}" for line in others)
        super().__init__(f"rank {rank} of {world_size} failed:\n{detail.rstrip()}{also}")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listened on a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(fn: Callable[..., Any], world_size: int, backend: str = "gloo", threads: int = 1,
              args: Sequence[Any] = (), timeout_s: float = 300.0) -> list[Any]:
    """Run `fn(rank, world_size, *args)` in `world_size` spawned ranks of one process group.

    `fn` must be a module-level function and `args` and its result picklable; ranks may
    exceed the core count (they are processes of `threads` threads each). With "nccl"
    rank r uses cuda:r. Returns the results in rank order. A rank's exception is raised
    here as `RankError` naming the rank, with its traceback; a run that has not finished
    after `timeout_s` (the whole call, start-up included) raises `TimeoutError`. Either
    way every process this call started is stopped before it returns.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend {backend!r}: allowed {', '.join(BACKENDS)}")
    if world_size < 1 or threads < 1:
        raise ValueError(f"world_size={world_size}, threads={threads}: both must be >= 1")
    if backend == "nccl" and torch.cuda.device_count() < world_size:
        raise ValueError(f"backend 'nccl' with world_size={world_size} needs {world_size} GPUs "
                         f"(one per rank); this machine has {torch.cuda.device_count()}")
    try:
        pickle.dumps((fn, tuple(args)))
    except Exception as err:  # noqa: BLE001 - any pickling failure means the same thing here
        raise TypeError(f"run_ranks needs a module-level fn and picklable args: {err}") from None

    spawn = mp.get_context("spawn")
    port = free_port()
    procs, pipes = [], []
    polite_s = 0.0  # after a failure nothing is worth waiting for
    try:
        for rank in range(world_size):
            reader, writer = spawn.Pipe(duplex=False)
            # not daemonic: a rank may start processes of its own (DataLoader workers)
            p = spawn.Process(target=_rank_main, name=f"rank{rank}",
                              args=(fn, rank, world_size, backend, threads, port, timeout_s,
                                    tuple(args), writer))
            p.start()
            writer.close()  # the child holds its copy; ours would hide the child's exit from recv
            procs.append(p)
            pipes.append(reader)
        results = _collect(procs, pipes, world_size, time.monotonic() + timeout_s, timeout_s)
        polite_s = STOP_GRACE_S
        return results
    finally:
        stop_started(procs, polite_s)
        for reader in pipes:
            reader.close()


def _collect(procs: list, pipes: list[Connection], world_size: int, deadline: float,
             timeout_s: float) -> list[Any]:
    """Wait for every rank's answer; raise the earliest failure or a timeout."""
    results: dict[int, Any] = {}
    errors: list[tuple[float, int, str]] = []  # (the rank's wall clock, rank, traceback text)
    waiting = dict(enumerate(pipes))
    while waiting:
        now = time.monotonic()
        if now >= deadline:
            break
        for reader in wait(list(waiting.values()), timeout=deadline - now):
            rank = pipes.index(reader)
            try:
                status, *payload = reader.recv()
            except EOFError:  # the process ended without sending: crashed or killed
                procs[rank].join(1.0)
                status, payload = "error", [time.time(), f"exited with code {procs[rank].exitcode} "
                                            "and no result"]
            del waiting[rank]
            if status == "ok":
                results[rank] = payload[0]
                continue
            if not errors:  # the peers of a failed rank get a short grace to say why they failed
                deadline = min(deadline, time.monotonic() + ERROR_GRACE_S)
            errors.append((payload[0], rank, payload[1]))
    errors.sort()
    if errors:
        _, rank, detail = errors[0]
        others = [f"rank {r}: {d.strip().splitlines()[-1]}" for _, r, d in errors[1:]]
        raise RankError(rank, world_size, detail, others)
    if waiting:
        raise TimeoutError(f"ranks {sorted(waiting)} of {world_size} gave no result within "
                           f"{timeout_s:g} s; stopped them")
    return [results[r] for r in range(world_size)]


def stop_started(procs: list, polite_s: float, grace_s: float = STOP_GRACE_S) -> None:
    """Join every started process for `polite_s`; SIGTERM, then SIGKILL after `grace_s`, those
    still running."""
    deadline = time.monotonic() + polite_s
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.terminate()
    for p in procs:
        p.join(grace_s)
        if p.is_alive():
            p.kill()
            p.join(grace_s)


def _rank_main(fn: Callable[..., Any], rank: int, world_size: int, backend: str, threads: int,
               port: int, timeout_s: float, args: tuple, conn: Connection) -> None:
    """The body of one spawned rank: set up the group, run fn, report, tear down."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world_size))
    if backend == "gloo":
        os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    try:
        keep_freed_memory()
        torch.set_num_threads(threads)
        barrier_kw = {}
        if backend == "nccl":
            torch.cuda.set_device(rank)
            barrier_kw = {"device_ids": [rank]}
        dist.init_process_group(backend, rank=rank, world_size=world_size,
                                timeout=timedelta(seconds=timeout_s))
        result = fn(rank, world_size, *args)
        dist.barrier(**barrier_kw)  # nobody tears down while a peer still talks to it
        dist.destroy_process_group()
        conn.send(("ok", result))
    except BaseException:  # noqa: BLE001 - everything a rank raises goes to the parent
        conn.send(("error", time.time(), traceback.format_exc()))
        if dist.is_initialized():
            dist.destroy_process_group()  # may hang on a dead peer; the parent then stops us
    finally:
        conn.close()
