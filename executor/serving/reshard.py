"""Dynamic re-sharding (Seesaw) in the real engine: prefill in one layout, decode in another.

A deployment whose `decode` layout differs from its `prefill` layout (same number of ranks,
`scheduler: seesaw`, a `cpu_kv_buffer_GB`) runs as the simulator's `SeesawReplica` does
(simulator/serving/seesaw.py), on real ranks, with the simulator's policy imported, not
rewritten (`next_phase`, `prefill_take`, `decode_take`, `decode_evictions`):

```
prefill phase (layout P)                 transition P -> D                 decode phase (layout D)
------------------------                 -----------------                 -----------------------
prefill_take: prompts that fit the       every rank: pending copies done,  decode_take: sequences from
pool and the CPU buffer; one step;       shards of D cut from its CPU      the buffer; "kv to gpu" copies
first tokens sampled; each rank          copy of the full weights; a       prefetched on a copy thread
copies its layers/heads of every         barrier (all KV is in the         while earlier ones decode;
prompt's KV to the shared CPU buffer     buffer before anyone reads it)    finished ones leave; KV past
("kv to cpu"), prefill blocks freed                                        the pool goes back ("kv to cpu")
```
and back to P (weights only) once the buffer is empty and every sequence has finished, if a
request waits. `next_phase` decides; the engine asks it before every step.

The CPU-tier buffer (`KVBuffer`) holds the whole model's K/V (every layer, every K/V head)
in block-paged tensors in shared memory, which every rank maps: a rank writes the layers of
its stage and the heads of its TP rank under the prefill layout and reads those of its
decode layout, so the buffer re-splits the KV by heads and layers between the two. Rank 0
owns the buffer's block tables and the scheduling; each step's copies go to the workers as
ops, replayed before the step (`ReshardRank.apply`).

Prefetch overlap: a sequence's "kv to gpu" copy starts on each rank's copy thread when the
sequence is admitted, and the sequence joins a decode step from the next step on, so its copy
runs while the current step computes (a rank waits for the copies of a step's sequences
before running it). Only when no admitted sequence's copy has had a step to run (the first
step after a transition) does a step wait for one: the oldest, as the simulator's first
decode step waits for the first copy to arrive.

Accounting against the simulator's. The policy counts tokens; the engine holds blocks. So
that whatever the policy admits fits in blocks, the engine hands it capacities net of one
partly filled block per sequence a step can hold: `(num_blocks - pp x max_num_seqs) x
block_size` per phase, and the buffer's likewise; the buffer's use is counted in whole
blocks. `simulated_schedule` runs the simulator's replica on the same requests with these
numbers: an offline batch gives the same phases and transitions (timing only moves which
sequences a decode step takes while copies arrive).

Every transition, copy and step is recorded with the simulator's names (stream "compute":
"prefill", "decode", "to decode", "to prefill"; stream "kv": "kv to cpu", "kv to gpu"), so
`Engine.write_trace` lays beside `simtune simulate serve --trace`.

Both phases' KV pools stay allocated on every rank (the pool is small on the CPU; a GPU
deployment would free one for the other on a transition).
"""

from __future__ import annotations

import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from executor.serving.model import LlamaConfig, LlamaDecoder, cast_weights
from executor.serving.paged import PagedKV
from executor.serving.parallel import (
    Comm,
    Layout,
    check_layout,
    run_step,
    shard_decoder,
    shard_heads,
)
from executor.serving.runner import Item, PagedRunner
from simulator.serving.iteration import Work
from simulator.serving.kv_cache import BlockManager
from simulator.serving.schedulers import Step
from simulator.serving.seesaw import decode_evictions, decode_take, next_phase, prefill_take
from simulator.specs.hardware import GB

if TYPE_CHECKING:
    from executor.serving.engine import Engine, EngineSeq

PHASES = ("prefill", "decode")


class KVBuffer:
    """The CPU-tier KV buffer: K and V of every layer and K/V head, [kv_heads, blocks,
    block_size, head_dim] per layer, in shared memory (every rank maps the same tensors)."""

    def __init__(self, cfg: LlamaConfig, num_blocks: int, block_size: int, dtype: torch.dtype):
        shape = (cfg.n_kv_heads, num_blocks, block_size, cfg.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype).share_memory_() for _ in range(cfg.n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype).share_memory_() for _ in range(cfg.n_layers)]
        self.num_blocks, self.block_size = num_blocks, block_size

    @staticmethod
    def blocks_of(cfg: LlamaConfig, gigabytes: float, block_size: int, dtype: torch.dtype) -> int:
        """Blocks of the whole model's KV that `gigabytes` (10^9 bytes) hold."""
        per_block = 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * block_size * torch.finfo(dtype).bits // 8
        return int(gigabytes * GB // per_block)


class ReshardRank:
    """One rank's side of a re-sharding deployment (rank 0's and every worker's): its CPU copy
    of the full weights, the shard of the active layout, a KV pool per layout, the copy thread."""

    def __init__(self, full: LlamaDecoder, layouts: dict[str, Layout], comms: dict[str, Comm], rank: int,
                 buffer: KVBuffer, num_blocks: int, dtype: torch.dtype, device: torch.device):
        self.full, self.layouts, self.comms, self.rank, self.buffer = full, layouts, comms, rank, buffer
        self.dtype, self.device = dtype, device
        cfg = full.cfg
        self.layers = {p: lay.layers(cfg.n_layers, lay.stage(rank)) for p, lay in layouts.items()}
        self.heads = {p: shard_heads(cfg, lay, rank) for p, lay in layouts.items()}
        self.kvs = {p: PagedKV(len(self.layers[p]), len(self.heads[p]), cfg.head_dim, num_blocks, buffer.block_size,
                               0, dtype, device) for p in PHASES}
        self.copier = ThreadPoolExecutor(1, thread_name_prefix=f"kv-copy-rank{rank}")
        self.pending: dict[int, Future] = {}   # sequence id -> its "kv to gpu" copy
        self.phase, self.runner = "", None
        self.activate("prefill")

    def activate(self, phase: str) -> None:
        """Load this rank's shard of `phase`'s layout from the full weights (after every copy)."""
        for sid in list(self.pending):
            self.pending.pop(sid).result()
        lay = self.layouts[phase]
        part = shard_decoder(self.full, lay, self.rank)
        shard = LlamaDecoder(part.cfg, *cast_weights(part.embed, part.norm, part.layers, self.dtype, self.device))
        comm = self.comms[phase]
        self.runner = PagedRunner(shard, self.kvs[phase], comm.all_reduce if lay.tp > 1 else None)
        self.phase = phase

    def _pair(self, phase: str, layer: int, gl: int) -> tuple:
        kv, heads = self.kvs[phase], self.heads[phase]
        h = slice(heads.start, heads.stop)
        return (kv.k[layer], self.buffer.k[gl][h]), (kv.v[layer], self.buffer.v[gl][h])

    def copy_out(self, phase: str, gpu: list[int], buf: list[int]) -> None:
        """This rank's layers and heads of a sequence's KV, pool blocks `gpu` -> buffer `buf`."""
        g, b = torch.tensor(gpu, device=self.device), torch.tensor(buf)
        for layer, gl in enumerate(self.layers[phase]):
            for pool, host in self._pair(phase, layer, gl):
                host.index_copy_(1, b, pool.index_select(1, g).cpu())

    def copy_in(self, buf: list[int], gpu: list[int]) -> None:
        """This rank's decode-layout layers and heads of a sequence's KV, buffer -> pool. The
        pool may hold a block more than the buffer (the slot the next decode writes, when the
        KV so far fills whole blocks): the buffer's blocks go to the first pool blocks."""
        g, b = torch.tensor(gpu[:len(buf)], device=self.device), torch.tensor(buf)
        for layer, gl in enumerate(self.layers["decode"]):
            for pool, host in self._pair("decode", layer, gl):
                pool.index_copy_(1, g, host.index_select(1, b).to(self.device))

    def apply(self, ops: list[tuple]) -> list[tuple[int, Future]]:
        """Replay rank 0's copies: ("out", phase, seq, pool blocks, buffer blocks) now, ("in",
        seq, buffer blocks, pool blocks) on the copy thread; the copies started."""
        started = []
        for op in ops:
            if op[0] == "out":
                _, phase, sid, gpu, buf = op
                if sid in self.pending:  # evicted before its copy in was used
                    self.pending.pop(sid).result()
                self.copy_out(phase, gpu, buf)
            else:
                _, sid, buf, gpu = op
                self.pending[sid] = self.copier.submit(self._timed_copy_in, buf, gpu)
                started.append((sid, self.pending[sid]))
        return started

    def _timed_copy_in(self, buf: list[int], gpu: list[int]) -> tuple[float, float]:
        start = time.perf_counter()
        self.copy_in(buf, gpu)
        return start, time.perf_counter()

    def transition(self, phase: str, ops: list[tuple]) -> None:
        self.apply(ops)
        self.activate(phase)
        dist.barrier()   # every rank's KV is in the buffer before any rank reads it

    def step(self, items: list[Item]) -> torch.Tensor | None:
        for it in items:
            if it.seq_id in self.pending:
                self.pending.pop(it.seq_id).result()
        return run_step(self.runner, self.comms[self.phase], items)

    def close(self) -> None:
        self.copier.shutdown(wait=True)


def serve_worker(conn, state: ReshardRank) -> None:
    """A worker rank's loop under a re-sharding deployment (see workers.worker_main)."""
    while True:
        msg = conn.recv()
        if msg[0] == "stop":
            break
        if msg[0] == "transition":
            state.transition(msg[1], msg[2])
            continue
        _, items, tables, ops = msg
        state.apply(ops)
        state.kvs[state.phase].tables = tables
        state.step(items)
    state.close()


class Seesaw:
    """Rank 0's scheduler and driver of a re-sharding deployment, inside `Engine` (which admits
    arrivals, samples and records); the queues have the static scheduler's names so that the
    engine's abort and counters work on them (`swapped` is the CPU buffer)."""

    def __init__(self, engine: Engine, decoder: LlamaDecoder):
        from executor.serving.workers import RankGroup, ShardJob

        self.engine, config = engine, engine.config
        self.dep, cfg = config.deployment(), decoder.cfg
        self.layouts = {p: check_layout(getattr(self.dep, p).tp, getattr(self.dep, p).pp, cfg, p) for p in PHASES}
        bs = config.block_size
        buffer_blocks = KVBuffer.blocks_of(cfg, config.cpu_kv_buffer_GB, bs, decoder.dtype)
        net = {p: self.dep.max_num_seqs * self.layouts[p].pp for p in PHASES}
        self.capacity = {p: (config.num_blocks - net[p]) * bs for p in PHASES}
        self.buffer_tokens = (buffer_blocks - net["prefill"]) * bs
        for name, value, what in (("num_blocks", self.capacity, "KV pool"), ("cpu_kv_buffer_GB", self.buffer_tokens,
                                                                              "CPU buffer")):
            if (min(value.values()) if isinstance(value, dict) else value) < config.max_model_len:
                raise ValueError(f"{name}: the {what} must hold max_model_len = {config.max_model_len} tokens plus "
                                 f"a block for each of pp x max_num_seqs = {max(net.values())} sequences")
        self.buffer = KVBuffer(cfg, buffer_blocks, bs, decoder.dtype)
        self.buffer_free = list(range(buffer_blocks - 1, -1, -1))
        self.buffer_tables: dict[int, list[int]] = {}
        self.blocks = {p: BlockManager(config.num_blocks, bs, 0, watermark=0.0) for p in PHASES}
        job = ShardJob(self.layouts["prefill"], str(decoder.dtype).removeprefix("torch."), decoder.device.type,
                       config.num_blocks, bs, 0, torch.get_num_threads(), config.timeout_s, self.layouts["decode"])
        self.group = RankGroup(job)
        self.group.start(decoder, self.buffer)
        self.rank0 = ReshardRank(decoder, self.layouts, self.group.comms, 0, self.buffer, config.num_blocks,
                                 decoder.dtype, decoder.device)
        self.waiting: deque[EngineSeq] = deque()
        self.swapped: deque[EngineSeq] = deque()   # the CPU buffer, in decode order
        self.running: list[EngineSeq] = []         # the decode phase's sequences, oldest first
        self.prefilling: list[EngineSeq] = []      # never used: a prompt is prefilled in one step
        self.buffered = 0                          # buffer tokens in use (whole blocks)
        self.used = 0                              # decode phase: tokens of KV (the simulator's count)
        self.ready: set[int] = set()               # decode sequences whose copy has had a step to run
        self.ops: list[tuple] = []                 # copies for the workers to replay before the next message
        self.layout = "prefill"
        self.transitions = 0
        self.preemptions = 0
        self._use("prefill")

    # --- the engine's scheduler interface ------------------------------------------------------
    @property
    def idle(self) -> bool:
        return not (self.waiting or self.running or self.swapped)

    def add(self, seq: EngineSeq) -> None:
        self.waiting.append(seq)

    def forget(self, seq: EngineSeq) -> None:
        """An aborted sequence: give back its buffer blocks and its share of the decode count
        (the engine has taken it off the queues and freed its pool blocks)."""
        if seq.id in self.rank0.pending:
            self.rank0.pending.pop(seq.id).result()
        if seq in self.running:
            self.running.remove(seq)
            self.used -= seq.context
        self._free_buffer(seq.id)
        self.ready.discard(seq.id)

    def close(self) -> None:
        self.rank0.close()
        self.group.close()

    # --- steps ----------------------------------------------------------------------------------
    def step(self) -> list[EngineSeq]:
        take = prefill_take(self.waiting, self.dep, self.capacity["prefill"], self.buffered, self.buffer_tokens)
        phase = next_phase(self.layout, take > 0, bool(self.swapped), bool(self.running), bool(self.waiting))
        if phase is None:
            return []
        if phase != self.layout:
            self._transition(phase)
        return self._prefill(take) if phase == "prefill" else self._decode()

    def _use(self, phase: str) -> None:
        self.layout = phase
        self.engine.blocks, self.engine.kv = self.blocks[phase], self.rank0.kvs[phase]

    def _transition(self, phase: str) -> None:
        eng = self.engine
        start = eng.now()
        ops, self.ops = self.ops, []
        self._send(("transition", phase, ops))
        self._guard(self.rank0.transition, phase, [])
        self._use(phase)
        self.transitions += 1
        if eng.recorder is not None:
            eng.recorder.transition(0, f"to {phase}", start, eng.now())

    def _prefill(self, take: int) -> list[EngineSeq]:
        eng, blocks = self.engine, self.blocks["prefill"]
        batch = [self.waiting.popleft() for _ in range(take)]
        for seq in batch:
            blocks.allocate(seq.id, seq.prompt_len)
        eng.kv.sync(blocks, [s.id for s in batch])
        items = [eng._item(seq, seq.prompt_len) for seq in batch]
        emitting = self._run("prefill", batch, items, sum(len(it.tokens) for it in items))
        for seq in batch:
            seq.prefilled, seq.decoding = seq.prompt_len, True
        for seq in emitting:
            if seq.done:
                continue
            start = eng.now()
            tokens = seq.context - 1   # the KV computed so far: the first token's comes with its decode
            buf = self._alloc_buffer(seq.id, tokens)
            self.rank0.copy_out("prefill", eng.kv.tables[seq.id], buf)
            self.ops.append(("out", "prefill", seq.id, list(eng.kv.tables[seq.id]), buf))
            self.swapped.append(seq)
            if eng.recorder is not None:
                eng.recorder.box(0, "kv", "kv to cpu", start, eng.now(), tokens=tokens)
        for seq in batch:
            blocks.free(seq.id)
        eng.kv.sync(blocks, [])
        return emitting

    def _decode(self) -> list[EngineSeq]:
        eng, blocks, cap = self.engine, self.blocks["decode"], self.capacity["decode"]
        started = []
        for _ in range(decode_take(self.swapped, len(self.running), self.used, self.dep, cap)):
            seq = self.swapped.popleft()
            blocks.allocate(seq.id, seq.context)
            eng.kv.sync(blocks, [seq.id])
            op = ("in", seq.id, self.buffer_tables[seq.id], list(eng.kv.tables[seq.id]))
            self.ops.append(op)
            started += [(sid, fut, seq.context - 1) for sid, fut in self.rank0.apply([op])]
            self.running.append(seq)
            self.used += seq.context
        ready = [s for s in self.running if s.id in self.ready] or self.running[:1]
        items = [eng._item(seq, 1) for seq in ready]
        emitting = self._run("decode", ready, items, len(items))
        for seq in ready:   # its copy is done on every rank (each waited for it): its buffer blocks are free
            self._free_buffer(seq.id)
        self.ready.update(s.id for s in self.running)   # copies started now have overlapped a step
        self._record_copies(started)
        self.used += len(emitting)
        for seq in [s for s in self.running if s.done]:
            self.running.remove(seq)
            self.used -= seq.context
            self.ready.discard(seq.id)
            blocks.free(seq.id)
        for seq in self.running:   # the slot the next decode writes
            blocks.append(seq.id, seq.context - blocks.tokens(seq.id))
        for _ in range(decode_evictions([s.context for s in self.running], self.used, cap)):
            self._evict(self.running.pop())
        eng.kv.sync(blocks, [s.id for s in self.running])
        return emitting

    def _evict(self, seq: EngineSeq) -> None:
        """KV past the decode pool: the newest sequence goes back to the buffer front."""
        eng = self.engine
        start = eng.now()
        if seq.id in self.rank0.pending:
            self.rank0.pending.pop(seq.id).result()
        self._free_buffer(seq.id)
        self.ready.discard(seq.id)
        tokens = seq.context - 1
        buf = self._alloc_buffer(seq.id, tokens)
        gpu = list(eng.kv.tables[seq.id])
        self.rank0.copy_out("decode", gpu, buf)
        self.ops.append(("out", "decode", seq.id, gpu, buf))
        self.blocks["decode"].free(seq.id)
        self.used -= seq.context
        self.swapped.appendleft(seq)
        self.preemptions += 1
        if eng.recorder is not None:
            eng.recorder.box(0, "kv", "kv to cpu", start, eng.now(), tokens=tokens)

    def _run(self, kind: str, seqs: list[EngineSeq], items: list[Item], tokens: int) -> list[EngineSeq]:
        """One step on every rank; sample, emit, record; the sequences that emitted."""
        eng = self.engine
        start = eng.now()
        tables = {it.seq_id: list(eng.kv.tables[it.seq_id]) for it in items}
        ops, self.ops = self.ops, []
        self._send(("step", items, tables, ops))
        logits = self._guard(self.rank0.step, items)
        emitting = eng._sample(seqs, logits)
        end = eng.now()
        for seq in emitting:
            seq.emit(end)
            if seq.done and seq.finish_reason is None:
                seq.finish_reason = "length"
            if seq.done:
                eng.seqs.pop(seq.id, None)
                eng.stats.finished += 1
        eng._record(Step(kind, seqs, [Work(len(it.tokens), it.start, 1) for it in items], [len(it.tokens) for it in items]),
                    start, end, len(emitting), tokens if kind == "prefill" else 0)
        for seq in emitting:
            if seq.on_output:
                seq.on_output(seq)
        return emitting

    def _record_copies(self, started: list[tuple[int, Future, int]]) -> None:
        if self.engine.recorder is None:
            return
        for _, fut, tokens in started:   # done by now if the step took them in; else when it finishes
            fut.add_done_callback(lambda f, tokens=tokens: self._copy_box(f, tokens))

    def _copy_box(self, fut: Future, tokens: int) -> None:
        eng = self.engine
        if fut.exception() is None:   # perf_counter times on the engine's clock (its default)
            start, end = fut.result()
            eng.recorder.box(0, "kv", "kv to gpu", start - eng.t0, end - eng.t0, tokens=tokens)

    def _alloc_buffer(self, sid: int, tokens: int) -> list[int]:
        n = -(-tokens // self.buffer.block_size)
        if n > len(self.buffer_free):
            raise RuntimeError(f"sequence {sid}: needs {n} CPU buffer blocks, {len(self.buffer_free)} free; "
                               f"the policy and the buffer disagree")
        buf = [self.buffer_free.pop() for _ in range(n)]
        self.buffer_tables[sid] = buf
        self.buffered += n * self.buffer.block_size
        return buf

    def _free_buffer(self, sid: int) -> None:
        buf = self.buffer_tables.pop(sid, None)
        if buf is not None:
            self.buffer_free.extend(reversed(buf))
            self.buffered -= len(buf) * self.buffer.block_size

    def _send(self, msg) -> None:
        self._guard(self.group.send, msg)

    def _guard(self, fn, *args):
        from executor.serving.workers import RankFailed

        group = self.group
        if group.closed:
            raise RankFailed(0, group.world_size, "the engine's ranks were stopped")
        group.check()
        try:
            return fn(*args)
        except RankFailed:
            raise
        except Exception as exc:  # noqa: BLE001 - a pipe or a collective failed: some rank is gone
            raise group.failure(exc) from exc


def simulated_schedule(engine: Engine, requests: list, cluster: str = "2xcpu", model: str = "smollm2-135m"):
    """The simulator's `SeesawReplica` run on `requests` (simulator `Request`s) with this
    engine's deployment, capacities and buffer; its `Recorder` (`transitions`, `steps`, the
    trace events). For comparing a measured schedule with the simulated one."""
    import simpy

    from simulator.serving.iteration import IterationModel
    from simulator.serving.recorder import Recorder
    from simulator.serving.seesaw import SeesawReplica
    from simulator.serving.sequence import Seq
    from simulator.specs.catalog import load_cluster, load_model

    sw: Seesaw = engine.reshard
    spec, hw = load_model(model), load_cluster(cluster)
    env, rec = simpy.Environment(), Recorder(trace=True)
    models = [IterationModel(spec, hw, getattr(sw.dep, p)) for p in PHASES]
    replica = SeesawReplica(env, 0, sw.dep, *models, dict(sw.capacity), sw.buffer_tokens, hw, rec)
    for req in requests:
        replica.submit(Seq(req))
    env.run()
    return rec
