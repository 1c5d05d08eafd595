"""The ranks of a parallel engine: worker processes, their control channel, and failures.

```
rank 0 (this process: scheduler, sampler, HTTP)        ranks 1 .. N-1 (spawned processes)
-----------------------------------------------        ----------------------------------
RankGroup.start: spawn workers, init the group  <--->  init the group (gloo / nccl, timeout)
  rank 0's shard of the weights, its Comm              load the weights, keep their shard
                                                <----  "ready" on the pipe
each step: ParallelRunner.forward(items)
  pipe: ("step", items, block tables, swap copies) ->  copy swapped blocks, take the tables
  run_step: rank 0's layers, all-reduce / send  <--->  run_step: its layers, all-reduce / send
  <- final rows from the last stage; LM head, sample
Engine.close -> ("stop",) on every pipe         ---->  destroy the group, exit
```

Why a pipe per worker rather than a broadcast over the process group: a serving engine sits
idle for as long as no request comes, and every torch.distributed call carries the group's
timeout; workers blocked on a pipe wait forever at no cost, and see rank 0's exit as an
end-of-file. The collectives of a step (all-reduce, send/recv) keep the timeout, so a rank
that stops answering mid-step ends the step with an error after `timeout_s` at most; a
rank that dies closes its sockets and its peers' collectives fail at once.

Failures are `RankFailed`, naming the rank: rank 0 checks its workers' exit codes before
each step and turns any error of a step (a broken pipe, a collective that failed or timed
out) into `RankFailed` for the rank that died first (one that exited without reporting, as
a killed process does, before one that reported an error: its peers' errors follow from
it). `RankGroup.close` stops every worker it started, by process object: "stop", a grace,
then SIGTERM, then SIGKILL.
"""

from __future__ import annotations

import os
import time
import traceback
from dataclasses import dataclass
from datetime import timedelta
from multiprocessing.connection import Connection, wait

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from executor.allocator import keep_freed_memory
from executor.serving.model import LlamaDecoder, cast_weights, load_decoder
from executor.serving.paged import PagedKV
from executor.serving.parallel import Comm, Layout, run_step, shard_decoder
from executor.serving.runner import Item, PagedRunner
from profiler.ranks import free_port, stop_started

STOP_GRACE_S = 3.0
REPORT_GRACE_S = 2.0   # after a failure, how long the other ranks get to report theirs


class RankFailed(RuntimeError):
    """A rank of a parallel engine died or failed; the engine cannot step any more."""

    def __init__(self, rank: int, world_size: int, detail: str):
        self.rank, self.world_size, self.detail = rank, world_size, detail
        super().__init__(f"rank {rank} of {world_size} failed: {detail.rstrip()}")


@dataclass(frozen=True)
class ShardJob:
    """What a worker needs to build its shard (picklable: it travels to spawned processes)."""

    layout: Layout
    dtype: str = "float32"
    device_type: str = "cpu"
    num_blocks: int = 1024
    block_size: int = 16
    num_cpu_blocks: int = 0
    threads: int = 1
    timeout_s: float = 60.0
    decode: Layout | None = None   # a re-sharding deployment's decode layout (`layout` is its prefill's)

    @property
    def backend(self) -> str:
        return "nccl" if self.device_type == "cuda" else "gloo"

    def device(self, rank: int) -> torch.device:
        return torch.device("cuda", rank) if self.device_type == "cuda" else torch.device("cpu")


def _init_group(job: ShardJob, rank: int, port: int) -> dict[str, Comm]:
    """Join the group; this rank's Comm of each layout ("prefill", and "decode" when re-sharding),
    built in the same order on every rank (`new_group` is collective)."""
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    if job.device_type == "cuda":
        torch.cuda.set_device(rank)
    dist.init_process_group(job.backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=job.layout.world_size, timeout=timedelta(seconds=job.timeout_s))
    comms = {"prefill": Comm(job.layout, rank)}
    if job.decode is not None:
        comms["decode"] = Comm(job.decode, rank)
    return comms


def _reshard_worker(rank: int, job: ShardJob, port: int, conn: Connection) -> None:
    """A worker of a re-sharding deployment: keeps the full weights (shared memory), loads the
    active layout's shard on each transition (executor/serving/reshard.py)."""
    from executor.serving.reshard import ReshardRank, serve_worker

    cfg, embed, norm, layers, buffer = conn.recv()
    full = LlamaDecoder(cfg, embed, norm, layers)
    comms = _init_group(job, rank, port)
    state = ReshardRank(full, {"prefill": job.layout, "decode": job.decode}, comms, rank, buffer, job.num_blocks,
                        getattr(torch, job.dtype), job.device(rank))
    conn.send(("ready",))
    serve_worker(conn, state)


def _shard_kv(shard: LlamaDecoder, job: ShardJob) -> PagedKV:
    cfg = shard.cfg
    return PagedKV(cfg.n_layers, cfg.n_kv_heads, cfg.head_dim, job.num_blocks, job.block_size,
                   job.num_cpu_blocks, shard.dtype, shard.device)


def worker_main(rank: int, job: ShardJob, port: int, conn: Connection) -> None:
    """The body of a worker rank: build its shard, then run every step rank 0 sends."""
    try:
        keep_freed_memory()
        torch.set_num_threads(job.threads)
        if job.decode is not None:
            _reshard_worker(rank, job, port, conn)
            dist.destroy_process_group()
            conn.send(("stopped",))
            return
        cfg, embed, norm, layers = conn.recv()   # its shard, in shared memory (see RankGroup.start)
        shard = LlamaDecoder(cfg, *cast_weights(embed, norm, layers, getattr(torch, job.dtype), job.device(rank)))
        comm = _init_group(job, rank, port)["prefill"]
        kv = _shard_kv(shard, job)
        runner = PagedRunner(shard, kv, comm.all_reduce if job.layout.tp > 1 else None)
        conn.send(("ready",))
        while True:
            msg = conn.recv()
            if msg[0] == "stop":
                break
            _, items, tables, ops = msg
            for direction, src, dst in ops:
                kv.copy_blocks(direction, src, dst)
            kv.tables = tables
            run_step(runner, comm, items)
        dist.destroy_process_group()
        conn.send(("stopped",))
    except EOFError:  # rank 0 is gone: nothing to report to
        os._exit(1)
    except BaseException:  # noqa: BLE001 - everything a worker raises goes to rank 0
        try:
            conn.send(("error", time.time(), traceback.format_exc()))
        finally:
            os._exit(1)  # no teardown: it may wait on a dead peer


def stop_processes(procs: list, pipes: list[Connection], grace_s: float) -> None:
    """Stop processes started here, each by its process object: ("stop",) on its pipe, `grace_s`
    for all to exit, then SIGTERM, then SIGKILL; close the pipes."""
    for p, conn in zip(procs, pipes):
        if p.exitcode is None:
            try:
                conn.send(("stop",))
            except OSError:
                pass
    stop_started(procs, grace_s, grace_s)
    for conn in pipes:
        conn.close()


class RankGroup:
    """Rank 0's side of the ranks: start them, send each step, notice failures, stop them."""

    def __init__(self, job: ShardJob):
        self.job, self.procs, self.pipes = job, [], []
        self.comm: Comm | None = None
        self.comms: dict[str, Comm] = {}
        self.closed = False

    @property
    def world_size(self) -> int:
        return self.job.layout.world_size

    def start(self, decoder: LlamaDecoder | None = None, buffer=None) -> LlamaDecoder:
        """Spawn ranks 1..N-1, hand each its shard of `decoder` (loaded from the GGUF file when
        None), join the group as rank 0; rank 0's shard. Raises RankFailed if a rank fails to
        start. The shards travel through the pipes as torch.multiprocessing shares tensors (in
        shared memory, not copied through the pipe), so workers neither read nor dequantize the
        weights file: under load that took 10-15 s per process here. A re-sharding job
        (`job.decode`) hands every worker the whole weights and the CPU KV `buffer` instead
        (both shared), and returns `decoder` itself: executor/serving/reshard.py cuts the shards."""
        job = self.job
        if decoder is None:
            decoder = load_decoder(None, getattr(torch, job.dtype), job.device(0))
        spawn = mp.get_context("spawn")
        port = free_port()
        try:
            for rank in range(1, self.world_size):
                ours, theirs = spawn.Pipe(duplex=True)
                p = spawn.Process(target=worker_main, name=f"simtune-serve-rank{rank}",
                                  args=(rank, job, port, theirs), daemon=True)
                p.start()
                theirs.close()
                self.procs.append(p)
                self.pipes.append(ours)
                if job.decode is not None:
                    ours.send((decoder.cfg, *cast_weights(decoder.embed, decoder.norm, decoder.layers,
                                                          decoder.dtype, "cpu"), buffer))
                    continue
                part = shard_decoder(decoder, job.layout, rank)
                ours.send((part.cfg, *cast_weights(part.embed, part.norm, part.layers, part.dtype, "cpu")))
            self.comms = _init_group(job, 0, port)
            self.comm = self.comms["prefill"]
            shard = decoder if job.decode is not None else shard_decoder(decoder, job.layout, 0)
            self._wait_ready(time.monotonic() + job.timeout_s)
            return shard
        except BaseException:
            self.close()
            raise

    def _wait_ready(self, deadline: float) -> None:
        waiting = set(range(len(self.pipes)))
        while waiting:
            if time.monotonic() >= deadline:
                raise RankFailed(min(waiting) + 1, self.world_size, "did not start in time")
            for conn in wait([self.pipes[i] for i in waiting], timeout=deadline - time.monotonic()):
                i = self.pipes.index(conn)
                try:
                    msg = conn.recv()
                except EOFError:
                    raise self.failure() from None
                if msg[0] != "ready":
                    raise self.failure()
                waiting.discard(i)

    def kv(self, shard: LlamaDecoder) -> PagedKV:
        return _shard_kv(shard, self.job)

    def runner(self, shard: LlamaDecoder, kv: PagedKV) -> ParallelRunner:
        return ParallelRunner(shard, kv, self)

    def check(self) -> None:
        """RankFailed if a worker has exited."""
        if any(p.exitcode is not None for p in self.procs):
            raise self.failure()

    def send(self, msg) -> None:
        for conn in self.pipes:
            conn.send(msg)

    def failure(self, cause: BaseException | None = None) -> RankFailed:
        """The failure to report: a rank that exited without a word, else the earliest report."""
        deadline = time.monotonic() + REPORT_GRACE_S
        reports: dict[int, tuple[float, str]] = {}
        while time.monotonic() < deadline and len(reports) < len(self.procs):
            for rank, (p, conn) in enumerate(zip(self.procs, self.pipes), start=1):
                if rank in reports:
                    continue
                try:
                    if conn.poll():
                        msg = conn.recv()
                        if msg[0] == "error":
                            reports[rank] = (msg[1], msg[2].strip().splitlines()[-1])
                except (EOFError, OSError):
                    p.join(0.2)
                    if p.exitcode is not None:
                        reports[rank] = (0.0, f"exited with code {p.exitcode} without a report "
                                              f"(killed or crashed)")
            if any(t == 0.0 for t, _ in reports.values()):
                break
            time.sleep(0.05)
        if reports:
            rank, (_, detail) = min(reports.items(), key=lambda kv: (kv[1][0], kv[0]))
            return RankFailed(rank, self.world_size, detail)
        detail = f"{type(cause).__name__}: {cause}" if cause is not None else "no rank reported"
        return RankFailed(0, self.world_size, detail)

    def close(self) -> None:
        """Stop every worker (politely, then by signal) and leave the process group."""
        if self.closed:
            return
        self.closed = True
        stop_processes(self.procs, self.pipes, STOP_GRACE_S)
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:  # noqa: BLE001 - a dead peer may fail the teardown; nothing to save
                pass


class ParallelRunner(PagedRunner):
    """Rank 0's runner: sends the step to every worker, then runs its own part (`run_step`)."""

    def __init__(self, shard: LlamaDecoder, kv: PagedKV, group: RankGroup):
        super().__init__(shard, kv, group.comm.all_reduce if group.job.layout.tp > 1 else None)
        self.group = group
        kv.ops = []   # swap copies, replayed by the workers on their shards

    def forward(self, items: list[Item]) -> torch.Tensor:
        group = self.group
        if group.closed:
            raise RankFailed(0, group.world_size, "the engine's ranks were stopped")
        group.check()
        tables = {it.seq_id: list(self.kv.tables[it.seq_id]) for it in items}
        ops, self.kv.ops = self.kv.ops, []
        try:
            group.send(("step", items, tables, ops))
            return run_step(self, group.comm, items)
        except RankFailed:
            raise
        except Exception as exc:  # noqa: BLE001 - a pipe or a collective failed: some rank is gone
            raise group.failure(exc) from exc
