"""Paged KV-cache block accounting for one replica, in the style of vLLM's block manager.

PagedAttention (Kwon et al., SOSP'23) stores a sequence's keys and values in fixed-size
blocks of `block_size` tokens, so a sequence holds ceil(tokens / block_size) blocks and
wastes at most one partly filled block. `BlockManager` keeps only that accounting: which
sequences hold how many tokens and blocks, on the GPU or (after a swap) on the CPU.

Design note: the simulator asks about every running sequence at every iteration, so the
manager keeps integer counters per sequence (tokens, blocks) and two pool totals instead of
per-block objects or free lists. Block identity does not matter for timing, with one
exception, below.

Prefix caching (`prefix_caching=True`, vLLM's automatic prefix caching): a full block of a
prompt is known by a key of its content and everything before it (`Seq.block_keys`: equal
keys, equal KV). Once a prompt chunk is computed, its full blocks become cached blocks
(`cache_blocks`), which any later prompt opening with the same keys shares instead of
computing (`cached_prefix`, then `allocate(..., cached=)`), counted once in the pool however
many sequences hold them. A cached block no sequence holds any more stays cached but counts
as free: it is evicted, least recently released first, only when a new block needs its
place. At most all but the prompt's last token are taken from the cache (its logits must be
computed). A sequence's shared blocks are always its leading ones; swapping a sequence out
copies them and lets go of them (on the CPU all its blocks are its own). The engine's block
tables follow the same decisions (`cache_events`, read by executor/serving/paged.py).

A decode batch that keeps its sequences' counts as arrays (`batch.DecodeBatch`) tells the
manager of their growth in bulk, one `append_batch` per engine event for the whole batch,
instead of one `append` per sequence and block: the pool totals stay exact after every
event, and the blocks a sequence gained in the batch become its own (`settle`, through
`append`) before it is preempted; a finished one gives them back with the batch's count.

Admission rules follow vLLM v0 (`BlockSpaceManager`):
- A new sequence (`allocate`) and a swapped-in one (`swap_in`) must leave at least
  `watermark_blocks = int(watermark * num_gpu_blocks)` blocks free, so that running
  sequences can still grow by a block each without immediate preemption.
- A running sequence growing (`append`) may use every free block, watermark included.
- `swap_out` moves all of a sequence's blocks to the CPU pool and needs room there.
Operations that do not fit raise `OutOfBlocks`; misuse (unknown or duplicate ids, appending
to a swapped-out sequence) raises KeyError or ValueError.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Sequence

SeqId = Hashable


class OutOfBlocks(Exception):
    """An allocation, append or swap needs more KV blocks than the pool can give now."""

    def __init__(self, seq_id: SeqId, op: str, needed: int, free: int, detail: str = ""):
        self.seq_id = seq_id
        self.op = op
        self.needed = needed
        self.free = free
        self.detail = detail
        # args are the constructor's, so the exception can be re-raised by copy (simpy does)
        super().__init__(seq_id, op, needed, free, detail)

    def __str__(self) -> str:
        msg = f"{self.op} of sequence {self.seq_id!r} needs {self.needed} blocks, {self.free} free"
        return f"{msg} ({self.detail})" if self.detail else msg


def kv_blocks_capacity(free_bytes: float, bytes_per_token: float, block_size: int) -> int:
    """How many KV blocks of `block_size` tokens fit in `free_bytes`.

    `bytes_per_token` is the KV footprint of one token on the device whose memory
    `free_bytes` measures (keys and values of every layer it holds, for its heads).
    """
    if bytes_per_token <= 0:
        raise ValueError(f"bytes_per_token = {bytes_per_token!r}: must be > 0")
    if block_size < 1:
        raise ValueError(f"block_size = {block_size!r}: must be >= 1")
    if free_bytes <= 0:
        return 0
    return int(free_bytes // (bytes_per_token * block_size))


class BlockManager:
    """Paged KV-cache accounting of one replica: a GPU block pool and an optional CPU pool."""

    def __init__(self, num_gpu_blocks: int, block_size: int, num_cpu_blocks: int = 0,
                 watermark: float = 0.01, prefix_caching: bool = False):
        if num_gpu_blocks < 0:
            raise ValueError(f"num_gpu_blocks = {num_gpu_blocks!r}: must be >= 0")
        if num_cpu_blocks < 0:
            raise ValueError(f"num_cpu_blocks = {num_cpu_blocks!r}: must be >= 0")
        if block_size < 1:
            raise ValueError(f"block_size = {block_size!r}: must be >= 1")
        if not 0.0 <= watermark < 1.0:
            raise ValueError(f"watermark = {watermark!r}: must be in [0, 1)")
        self.num_gpu_blocks = int(num_gpu_blocks)
        self.num_cpu_blocks = int(num_cpu_blocks)
        self.block_size = int(block_size)
        self.watermark = watermark
        self.watermark_blocks = int(watermark * num_gpu_blocks)
        self._tokens: dict[SeqId, int] = {}
        self._blocks: dict[SeqId, int] = {}
        self._on_cpu: set[SeqId] = set()
        self._used_gpu = 0
        self._used_cpu = 0
        self._batch_blocks = 0  # GPU blocks a decode batch's sequences hold beyond their own counts
        # prefix caching: cached block key -> sequences holding it; those held by none, oldest
        # release first; each sequence's block keys and how many of its leading blocks are cached
        self.prefix_caching = prefix_caching
        self._refs: dict[Hashable, int] = {}
        self._evictable: OrderedDict[Hashable, None] = OrderedDict()
        self._keys: dict[SeqId, Sequence[Hashable]] = {}
        self._shared: dict[SeqId, int] = {}
        self.evictions = 0
        self.cache_events: list[tuple] | None = None   # ("cache", seq, index, key) / ("evict", key), when a list

    # -- pool state ---------------------------------------------------------------------

    @property
    def num_free_gpu_blocks(self) -> int:
        """Blocks a sequence may take now: unused ones and cached ones no sequence holds."""
        return self.num_gpu_blocks - self._used_gpu

    @property
    def num_cached_blocks(self) -> int:
        """Prefix caching: cached blocks, held by sequences or not."""
        return len(self._refs)

    @property
    def num_used_gpu_blocks(self) -> int:
        return self._used_gpu

    @property
    def num_free_cpu_blocks(self) -> int:
        return self.num_cpu_blocks - self._used_cpu

    @property
    def num_used_cpu_blocks(self) -> int:
        return self._used_cpu

    @property
    def utilization(self) -> float:
        """Fraction of GPU blocks in use (0 for an empty pool)."""
        return self._used_gpu / self.num_gpu_blocks if self.num_gpu_blocks else 0.0

    def __contains__(self, seq_id: SeqId) -> bool:
        return seq_id in self._tokens

    def __len__(self) -> int:
        return len(self._tokens)

    # -- per-sequence state -------------------------------------------------------------

    def blocks_for(self, num_tokens: int) -> int:
        """Blocks that hold `num_tokens` tokens: ceil(num_tokens / block_size)."""
        return -(-num_tokens // self.block_size)

    def tokens(self, seq_id: SeqId) -> int:
        return self._tokens[self._known(seq_id)]

    def blocks(self, seq_id: SeqId) -> int:
        return self._blocks[self._known(seq_id)]

    def on_cpu(self, seq_id: SeqId) -> bool:
        return self._known(seq_id) in self._on_cpu

    # -- allocation ---------------------------------------------------------------------

    def can_allocate(self, seq_id: SeqId, num_tokens: int, keys: Sequence[Hashable] | None = None,
                     cached: int = 0) -> bool:
        """Whether a new sequence's first `num_tokens` fit now, leaving the watermark free; with
        prefix caching, its first `cached` tokens (from `cached_prefix`) are cached blocks."""
        self._new(seq_id, num_tokens)
        return self.num_free_gpu_blocks - self._new_blocks(num_tokens, keys, cached) >= self.watermark_blocks

    def allocate(self, seq_id: SeqId, num_tokens: int, keys: Sequence[Hashable] | None = None,
                 cached: int = 0) -> None:
        """Reserve blocks for a new sequence's first `num_tokens` (its prompt, or a chunk). With
        prefix caching, `keys` are its prompt's full blocks' keys (`Seq.block_keys`), and its
        first `cached` tokens are taken from the cached blocks of the first keys."""
        if not self.can_allocate(seq_id, num_tokens, keys, cached):
            raise OutOfBlocks(seq_id, "allocate", self._new_blocks(num_tokens, keys, cached),
                              self.num_free_gpu_blocks, self._watermark_note())
        need = self.blocks_for(num_tokens)
        hits = cached // self.block_size
        for key in keys[:hits] if hits else ():
            refs = self._refs[key]
            if refs == 0:   # cached, held by none: counted as free until now
                del self._evictable[key]
                self._used_gpu += 1
            self._refs[key] = refs + 1
        self._tokens[seq_id] = num_tokens
        self._blocks[seq_id] = need
        self._used_gpu += need - hits
        if self.prefix_caching and keys is not None:
            self._keys[seq_id], self._shared[seq_id] = keys, hits
        if self._evictable:
            self._reclaim()

    # -- prefix caching -----------------------------------------------------------------

    def cached_prefix(self, keys: Sequence[Hashable], max_tokens: int) -> int:
        """Tokens at the start of a prompt with block keys `keys` whose blocks are cached: a
        multiple of block_size, at most `max_tokens` (0 without prefix caching)."""
        if not self.prefix_caching:
            return 0
        limit, refs, n = min(len(keys), max_tokens // self.block_size), self._refs, 0
        while n < limit and keys[n] in refs:
            n += 1
        return n * self.block_size

    def cache_blocks(self, seq_id: SeqId, num_tokens: int) -> int:
        """A sequence's first `num_tokens` have been computed: its full blocks among them become
        cached blocks it holds (up to the first whose key another sequence cached meanwhile: that
        one and the rest stay its own). How many of its leading blocks are cached now."""
        keys = self._keys.get(seq_id)
        if keys is None:
            return 0
        shared = self._shared[seq_id]
        full = min(num_tokens // self.block_size, len(keys), self._blocks[seq_id])
        while shared < full and keys[shared] not in self._refs:
            self._refs[keys[shared]] = 1
            if self.cache_events is not None:
                self.cache_events.append(("cache", seq_id, shared, keys[shared]))
            shared += 1
        self._shared[seq_id] = shared
        return shared

    def shared_blocks(self, seq_id: SeqId) -> int:
        """How many of a sequence's leading blocks are cached blocks (0 without prefix caching)."""
        return self._shared.get(self._known(seq_id), 0)

    def block_keys(self, seq_id: SeqId) -> Sequence[Hashable]:
        return self._keys.get(self._known(seq_id), ())

    def _new_blocks(self, num_tokens: int, keys: Sequence[Hashable] | None, cached: int) -> int:
        """Blocks a new sequence takes from the free count: all but the cached ones other
        sequences hold already. Checks `cached` against the cache."""
        need = self.blocks_for(num_tokens)
        if not cached:
            return need
        bs = self.block_size
        if cached < 0 or cached % bs or cached > num_tokens or keys is None or cached // bs > len(keys):
            raise ValueError(f"cached = {cached!r}: must be a multiple of block_size = {bs} within the "
                             f"{num_tokens} tokens and the {0 if keys is None else len(keys)} block keys given")
        missing = [k for k in keys[:cached // bs] if k not in self._refs]
        if missing:
            raise ValueError(f"cached = {cached!r}: the block of key {missing[0]!r} is not cached "
                             f"(take `cached` from cached_prefix just before)")
        return need - sum(1 for k in keys[:cached // bs] if self._refs[k] > 0)

    def _release(self, seq_id: SeqId) -> int:
        """A sequence lets go of its cached blocks (the last holder of one makes it evictable);
        how many it held."""
        shared, keys = self._shared.pop(seq_id, 0), self._keys.pop(seq_id, None)
        for key in keys[:shared] if shared else ():
            refs = self._refs[key] - 1
            self._refs[key] = refs
            if refs == 0:
                self._evictable[key] = None
                self._used_gpu -= 1
        return shared

    def _reclaim(self) -> None:
        """Evict the least recently released cached blocks whose places the pool now needs."""
        over = self._used_gpu + len(self._evictable) - self.num_gpu_blocks
        for _ in range(over):
            key, _ = self._evictable.popitem(last=False)
            del self._refs[key]
            self.evictions += 1
            if self.cache_events is not None:
                self.cache_events.append(("evict", key))

    def can_append(self, seq_id: SeqId, new_tokens: int = 1) -> bool:
        """Whether a sequence on the GPU can grow by `new_tokens` (watermark not applied)."""
        return self._growth(seq_id, new_tokens) <= self.num_free_gpu_blocks

    def append(self, seq_id: SeqId, new_tokens: int = 1) -> None:
        """Grow a sequence by `new_tokens`; new blocks only once its last block is full."""
        tokens = self._tokens.get(seq_id)
        if tokens is None or new_tokens < 0 or seq_id in self._on_cpu:
            need = self._growth(seq_id, new_tokens)  # raises the error that names the misuse
        else:  # the same arithmetic as _growth, without its checks: this runs once per new block
            need = -(-(tokens + new_tokens) // self.block_size) - self._blocks[seq_id]
        if need > self.num_gpu_blocks - self._used_gpu:
            raise OutOfBlocks(seq_id, "append", need, self.num_free_gpu_blocks)
        self._tokens[seq_id] += new_tokens
        self._blocks[seq_id] += need
        self._used_gpu += need
        if self._evictable:
            self._reclaim()

    def truncate(self, seq_id: SeqId, num_tokens: int) -> None:
        """Shrink a GPU sequence to `num_tokens` tokens (rejected speculative slots), freeing
        the blocks it no longer needs."""
        seq_id = self._on_gpu(seq_id)
        if not 0 <= num_tokens <= self._tokens[seq_id]:
            raise ValueError(f"num_tokens = {num_tokens!r}: must be in [0, {self._tokens[seq_id]}] "
                             f"for sequence {seq_id!r}")
        keep = self.blocks_for(num_tokens)
        if keep < self._shared.get(seq_id, 0):
            raise ValueError(f"num_tokens = {num_tokens!r}: sequence {seq_id!r} shares its first "
                             f"{self._shared[seq_id]} blocks with the prefix cache; keep them")
        self._used_gpu -= self._blocks[seq_id] - keep
        self._tokens[seq_id], self._blocks[seq_id] = num_tokens, keep

    def append_batch(self, new_blocks: int) -> None:
        """The sequences of the decode batch take `new_blocks` more GPU blocks in all (give
        back `-new_blocks` when negative); the batch keeps which sequence holds them."""
        if new_blocks > self.num_gpu_blocks - self._used_gpu:
            raise OutOfBlocks("decode batch", "append", new_blocks, self.num_free_gpu_blocks)
        if new_blocks < -self._batch_blocks:
            raise ValueError(f"new_blocks = {new_blocks!r}: the decode batch holds {self._batch_blocks}")
        self._batch_blocks += new_blocks
        self._used_gpu += new_blocks
        if self._evictable:
            self._reclaim()

    @property
    def num_batch_blocks(self) -> int:
        """GPU blocks the decode batch holds beyond its sequences' own counts."""
        return self._batch_blocks

    def settle(self, seq_id: SeqId, num_tokens: int) -> None:
        """A sequence leaves the decode batch holding `num_tokens` KV tokens: the blocks the
        batch held for it become its own (the pool total does not change)."""
        tokens = self._tokens[self._on_gpu(seq_id)]
        moved = self.blocks_for(num_tokens) - self._blocks[seq_id]
        if num_tokens < tokens or not 0 <= moved <= self._batch_blocks:
            raise ValueError(f"num_tokens = {num_tokens!r} for sequence {seq_id!r}: it holds {tokens} "
                             f"tokens and the decode batch {self._batch_blocks} blocks")
        self._batch_blocks -= moved
        self._used_gpu -= moved
        self.append(seq_id, num_tokens - tokens)

    def free(self, seq_id: SeqId) -> int:
        """Release a sequence (on the GPU or the CPU); return how many blocks it held."""
        blocks = self._blocks.pop(self._known(seq_id))
        del self._tokens[seq_id]
        shared = self._release(seq_id) if self._keys else 0
        if seq_id in self._on_cpu:
            self._on_cpu.remove(seq_id)
            self._used_cpu -= blocks
        else:
            self._used_gpu -= blocks - shared
        return blocks

    # -- preemption by swapping ---------------------------------------------------------

    def can_swap_out(self, seq_id: SeqId) -> bool:
        """Whether a GPU sequence's blocks fit in the free CPU pool."""
        return self._blocks[self._on_gpu(seq_id)] <= self.num_free_cpu_blocks

    def swap_out(self, seq_id: SeqId) -> int:
        """Move a sequence's blocks from the GPU to the CPU; return how many moved."""
        blocks = self._blocks[self._on_gpu(seq_id)]
        if blocks > self.num_free_cpu_blocks:
            raise OutOfBlocks(seq_id, "swap_out", blocks, self.num_free_cpu_blocks, "CPU pool")
        shared = self._release(seq_id) if self._keys else 0
        self._on_cpu.add(seq_id)
        self._used_gpu -= blocks - shared
        self._used_cpu += blocks
        return blocks

    def can_swap_in(self, seq_id: SeqId) -> bool:
        """Whether a swapped-out sequence fits back on the GPU, leaving the watermark free."""
        blocks = self._blocks[self._swapped(seq_id)]
        return self.num_free_gpu_blocks - blocks >= self.watermark_blocks

    def swap_in(self, seq_id: SeqId) -> int:
        """Move a swapped-out sequence's blocks back to the GPU; return how many moved."""
        if not self.can_swap_in(seq_id):
            raise OutOfBlocks(seq_id, "swap_in", self._blocks[seq_id], self.num_free_gpu_blocks,
                              self._watermark_note())
        blocks = self._blocks[seq_id]
        self._on_cpu.remove(seq_id)
        self._used_cpu -= blocks
        self._used_gpu += blocks
        if self._evictable:
            self._reclaim()
        return blocks

    # -- checks -------------------------------------------------------------------------

    def _known(self, seq_id: SeqId) -> SeqId:
        if seq_id not in self._tokens:
            raise KeyError(f"sequence {seq_id!r} holds no KV blocks (never allocated, or freed)")
        return seq_id

    def _on_gpu(self, seq_id: SeqId) -> SeqId:
        if self._known(seq_id) in self._on_cpu:
            raise ValueError(f"sequence {seq_id!r} is swapped out to the CPU; swap it in first")
        return seq_id

    def _swapped(self, seq_id: SeqId) -> SeqId:
        if self._known(seq_id) not in self._on_cpu:
            raise ValueError(f"sequence {seq_id!r} is on the GPU, not swapped out")
        return seq_id

    def _new(self, seq_id: SeqId, num_tokens: int) -> None:
        if seq_id in self._tokens:
            where = "CPU" if seq_id in self._on_cpu else "GPU"
            raise ValueError(f"sequence {seq_id!r} is already allocated "
                             f"({self._tokens[seq_id]} tokens on the {where}); use append")
        if num_tokens < 0:
            raise ValueError(f"num_tokens = {num_tokens!r} for sequence {seq_id!r}: must be >= 0")

    def _watermark_note(self) -> str:
        wm = self.watermark_blocks
        return f"{wm} more are kept free as watermark" if wm else ""

    def growth(self, seq_id: SeqId, new_tokens: int = 1) -> int:
        """New blocks a GPU sequence needs to hold `new_tokens` more tokens."""
        return self._growth(seq_id, new_tokens)

    def _growth(self, seq_id: SeqId, new_tokens: int) -> int:
        if new_tokens < 0:
            raise ValueError(f"new_tokens = {new_tokens!r} for sequence {seq_id!r}: must be >= 0")
        tokens = self._tokens[self._on_gpu(seq_id)]
        return -(-(tokens + new_tokens) // self.block_size) - self._blocks[seq_id]

    def __repr__(self) -> str:
        batch = f", {self._batch_blocks} held by the decode batch" if self._batch_blocks else ""
        cached = f", {len(self._refs)} cached ({len(self._evictable)} unheld)" if self.prefix_caching else ""
        return (f"BlockManager(gpu {self._used_gpu}/{self.num_gpu_blocks}{batch}{cached}, "
                f"cpu {self._used_cpu}/{self.num_cpu_blocks}, block_size={self.block_size}, "
                f"{len(self._tokens)} sequences)")
