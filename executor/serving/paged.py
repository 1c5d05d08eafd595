"""The paged KV cache's storage: physical blocks, block tables, a CPU swap pool.

The scheduler's `BlockManager` (simulator/serving/kv_cache.py, shared with the simulator)
decides: it counts each sequence's tokens and blocks, applies the watermark, and says who
is preempted, swapped or freed. It keeps counters only (no block identities: the simulator
needs none). `PagedKV` owns what the counters stand for: per layer a pool of
`num_blocks` blocks of `block_size` positions, a block table per sequence (its physical
block ids in order), a free list, and a CPU pool for swapped-out sequences.

Design note: one source of truth. After the scheduler plans or commits a step, `sync(kv)`
makes the tables agree with the manager's counters: tables of sequences the manager no
longer knows are freed, sequences it moved to the CPU are copied out (and back in), and
every GPU sequence gets exactly `kv.blocks(id)` blocks (grown from the free list, or
shrunk). Both pools have the manager's sizes, so whatever the manager admits the free lists
can hold; the policy is never written twice, and a scheduler change cannot make the
engine's memory disagree with the simulator's accounting.

Prefix caching: a cached block belongs to the cache, not to the sequences that hold it. The
manager tells of its decisions as events (`BlockManager.cache_events`, in order): a
sequence's block became cached under a key (that physical block is the key's from then on),
or a key was evicted (its block goes back to the free list). A new sequence whose leading
blocks are cached gets those blocks at the head of its table; a sequence that finishes,
or is swapped out, frees only the blocks after its shared ones (`shared`).

Layout: keys of layer l are `k[l]` of shape [kv_heads, num_blocks, block_size, head_dim]
(values alike). Writing new tokens is one `index_copy_` per layer at flat slots (block x
block_size + offset). Reading for attention gathers a sequence's blocks with `index_select`
into [kv_heads, B, blocks x block_size, head_dim]: a copy of 4 KiB runs (fp32, 16 positions
x 64 dims) per block, which on a CPU is the price of paging (measured by
benchmarks/bench_serving_engine.py); decoding sequences keep their gathered copy from step to
step and append to it (executor/serving/decode_kv.py), so they pay it only when their set changes. Both calls, not advanced indexing with a leading slice
(`k[l][:, table]`): on the 2-core machine this was written on, that took about 8 ms per call
whatever the size, index_select 0.03 ms for a few blocks and 1.4 ms for 64 x 15 blocks.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable

import torch

from simulator.serving.kv_cache import BlockManager


class PagedKV:
    def __init__(self, n_layers: int, kv_heads: int, head_dim: int, num_blocks: int, block_size: int,
                 num_cpu_blocks: int = 0, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        if num_blocks < 1:
            raise ValueError(f"num_blocks={num_blocks}: the pool needs at least 1 block")
        shape = (kv_heads, num_blocks, block_size, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        cpu_shape = (kv_heads, max(num_cpu_blocks, 1), block_size, head_dim)
        self.cpu_k = [torch.zeros(cpu_shape, dtype=dtype) for _ in range(n_layers)] if num_cpu_blocks else []
        self.cpu_v = [torch.zeros(cpu_shape, dtype=dtype) for _ in range(n_layers)] if num_cpu_blocks else []
        self.block_size, self.num_blocks, self.num_cpu_blocks = block_size, num_blocks, num_cpu_blocks
        self.free: list[int] = list(range(num_blocks - 1, -1, -1))      # pop() takes block 0 first
        self.cpu_free: list[int] = list(range(num_cpu_blocks - 1, -1, -1))
        self.tables: dict[int, list[int]] = {}       # sequence id -> GPU block ids
        self.cpu_tables: dict[int, list[int]] = {}   # sequence id -> CPU block ids (swapped out)
        self.cached: dict[Hashable, int] = {}        # prefix caching: block key -> GPU block id
        self.shared: dict[int, int] = {}             # sequence id -> its leading blocks that are cached
        self.swapped_blocks = 0                      # blocks copied either way, since creation
        self.ops: list[tuple[str, list[int], list[int]]] | None = None   # swap copies to replay elsewhere

    @property
    def used_blocks(self) -> int:
        return self.num_blocks - len(self.free)

    def sync(self, kv: BlockManager, live: Iterable[int]) -> None:
        """Make the block tables match the manager's counters (see the module docstring);
        `live` names every sequence the engine has not finished (the manager's own set)."""
        if kv.cache_events:
            self._follow_cache(kv.cache_events)
        for sid in [s for s in self.tables if s not in kv]:
            self.free.extend(reversed(self.tables.pop(sid)[self.shared.pop(sid, 0):]))
        for sid in [s for s in self.cpu_tables if s not in kv]:
            self.cpu_free.extend(reversed(self.cpu_tables.pop(sid)))
        for sid in [s for s in self.tables if kv.on_cpu(s)]:
            self._swap_out(sid)
        for sid in [s for s in self.cpu_tables if not kv.on_cpu(s)]:
            self._swap_in(sid)
        for sid in list(self.tables):  # shrink first (rejected slots), then grow
            table, want = self.tables[sid], kv.blocks(sid)
            while len(table) > want:
                self.free.append(table.pop())
        for sid in live:  # new sequences, and growth
            if sid not in kv or kv.on_cpu(sid):
                continue
            table = self.tables.get(sid)
            if table is None:   # a new sequence: its cached leading blocks first
                shared = kv.shared_blocks(sid)
                table = self.tables[sid] = [self.cached[key] for key in kv.block_keys(sid)[:shared]]
                if shared:
                    self.shared[sid] = shared
            want = kv.blocks(sid)
            if want - len(table) > len(self.free):
                raise RuntimeError(f"sequence {sid}: needs {want - len(table)} blocks, {len(self.free)} free; "
                                   f"the block manager and the pool disagree")
            while len(table) < want:
                table.append(self.free.pop())

    def _follow_cache(self, events: list[tuple]) -> None:
        """Apply the manager's prefix-cache decisions since the last sync, in order."""
        for event in events:
            if event[0] == "cache":
                _, sid, index, key = event
                self.cached[key] = self.tables[sid][index]
                self.shared[sid] = index + 1
            else:
                self.free.append(self.cached.pop(event[1]))
        events.clear()

    def _swap_out(self, sid: int) -> None:
        gpu = self.tables.pop(sid)
        cpu = [self.cpu_free.pop() for _ in gpu]
        self.copy_blocks("out", gpu, cpu)
        self.free.extend(reversed(gpu[self.shared.pop(sid, 0):]))   # cached blocks stay the cache's
        self.cpu_tables[sid] = cpu

    def _swap_in(self, sid: int) -> None:
        cpu = self.cpu_tables.pop(sid)
        gpu = [self.free.pop() for _ in cpu]
        self.copy_blocks("in", cpu, gpu)
        self.cpu_free.extend(reversed(cpu))
        self.tables[sid] = gpu

    def copy_blocks(self, direction: str, src: list[int], dst: list[int]) -> None:
        """Copy blocks to the CPU pool ("out": GPU ids `src` to CPU ids `dst`) or back ("in").
        With `ops` a list (set by a parallel engine's rank 0), the copy is also logged there,
        so that the other ranks repeat it on their own shards of the cache."""
        s, d = torch.tensor(src), torch.tensor(dst)
        for pool, cpool in zip((*self.k, *self.v), (*self.cpu_k, *self.cpu_v)):
            if direction == "out":
                cpool.index_copy_(1, d, pool.index_select(1, s).cpu())
            else:
                pool.index_copy_(1, d, cpool.index_select(1, s).to(pool.device))
        self.swapped_blocks += len(src)
        if self.ops is not None:
            self.ops.append((direction, list(src), list(dst)))

    # --- addressing ---------------------------------------------------------------------------
    def slots(self, sid: int, start: int, n: int) -> tuple[list[int], list[int]]:
        """(block ids, offsets) of positions start .. start+n-1 of a sequence."""
        table, bs = self.tables[sid], self.block_size
        pos = range(start, start + n)
        return [table[p // bs] for p in pos], [p % bs for p in pos]

    def padded_tables(self, sids: list[int], blocks: int) -> torch.Tensor:
        """Block tables [B, blocks], padded with block 0 (masked out by the caller)."""
        out = torch.zeros(len(sids), blocks, dtype=torch.long)
        for i, sid in enumerate(sids):
            t = self.tables[sid][:blocks]
            out[i, :len(t)] = torch.tensor(t, dtype=torch.long)
        return out

    def gather(self, layer: int, tables: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of the blocks `tables` [B, nb] as [B, kv_heads, nb * block_size, head_dim]."""
        b, nb = tables.shape
        flat = tables.reshape(-1)
        k, v = self.k[layer], self.v[layer]
        k = k.index_select(1, flat).view(k.shape[0], b, nb * self.block_size, k.shape[-1])
        v = v.index_select(1, flat).view(v.shape[0], b, nb * self.block_size, v.shape[-1])
        return k.transpose(0, 1), v.transpose(0, 1)

    def gather_heads(self, layer: int, flat: torch.Tensor, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of the blocks `flat` (`batch` block tables of equal length, concatenated) as
        [kv_heads * batch, blocks * block_size, head_dim], head-major: row h * batch + b is
        sequence b's K/V head h. One `index_select` each and no copy after it (what the batched
        decode attention reads, see executor/serving/runner.py)."""
        k, v = self.k[layer], self.v[layer]
        shape = (k.shape[0] * batch, flat.shape[0] // batch * self.block_size, k.shape[-1])
        return k.index_select(1, flat).view(shape), v.index_select(1, flat).view(shape)

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store K and V [T, kv_heads, head_dim] of T tokens at flat slots (block * block_size
        + offset)."""
        kvh, nb, bs, d = self.k[layer].shape
        self.k[layer].view(kvh, nb * bs, d).index_copy_(1, slots, k.transpose(0, 1))
        self.v[layer].view(kvh, nb * bs, d).index_copy_(1, slots, v.transpose(0, 1))
