"""A contiguous working copy of the K/V of the sequences that decode together, kept across steps.

Why: the decode attention (`decode_attention`, two batched matmuls) reads each sequence's keys
as one contiguous [keys, head_dim] matrix, and the paged pool scatters them over blocks.
Gathering every decoding sequence's blocks anew at every step (one `index_select` per layer for
K and one for V) was 13-17% of a decode step's op time with 64 sequences on the 2-core machines
(12 of 93 ms profiled on the AMD EPYC, 22 of 131 ms on the Xeon): it reads and writes the whole
KV once more per step. The runner now keeps the
gathered tensors from one step to the next and appends each step's new K/V to them in place
(one `index_copy_` per layer for K and one for V); it gathers again only when
- the set of decoding sequences (in batch order) is not the one the copy was made for,
- one of them did anything but decode one token since (its position is not the last + 1), or
  it ran as a prompt (chunk) or a speculative verification in between (`drop`),
- or the longest of them enters a new block (the copy holds as many blocks per sequence as the
  longest has, as the gather did).
So an offline batch gathers at its first decode step, then once every block_size (16) steps,
and again whenever a sequence finishes or joins. Measured against the per-step gather, all else
equal (offline 64 prompts x 128 tokens, bf16, interleaved in one session on the Xeon): 1.17x
output tokens/s at 1 thread, 1.27x at 2 (medians of 3; `benchmarks/bench_serving_engine.py
--against REV` repeats such a before/after comparison).

The paged pool stays the source of truth: every K/V is written there first, as before; the
block manager's allocation, preemption (recompute or swap), speculative rollback and
re-sharding copies read and write only the pool, and each of them changes the decoding set or
a sequence's position, which forces a new gather from the pool. A copy therefore always holds
the pool's K/V of its sequences' positions, and beyond each context the stale rows that the
attention mask hides (as the padding of a partly filled last block always was).

Why no headroom: a copy with spare blocks would have to be attended whole (batched matmuls over
a slice [:, :keys] of a longer buffer took 2.5-4x as long here as over a contiguous tensor),
and the bf16 batched matmul of probabilities x values rounds differently at some key counts
(112 vs 116 or 128 keys, masked keys included), which would break the token-for-token equality
with the sequential decoder; the copy attends exactly the keys the gather did, so its outputs
are bit for bit those of the gather.

Memory: one copy per decoding set (per micro-batch under pipeline parallelism), the size of
what the gather made every step; a copy is dropped when any of its sequences joins another.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from executor.serving.paged import PagedKV


@dataclass
class DecodeCopy:
    """One decoding set's K/V: per layer [kv_heads x B, blocks x block_size, head_dim], row
    h x B + b holding sequence b's K/V head h (the head-major order of `PagedKV.gather_heads`)."""

    ids: tuple[int, ...]
    starts: list[int]            # the position each sequence wrote at its last step
    blocks: int                  # blocks per sequence (the longest one's)
    k: list[torch.Tensor | None]
    v: list[torch.Tensor | None]
    fresh: bool = True           # gather from the pool at this step (a new copy)
    flat: torch.Tensor | None = None     # fresh: the block tables, padded to `blocks`, concatenated
    append: torch.Tensor | None = None   # otherwise: where each sequence's new K/V goes (b x keys + start)


class DecodeKV:
    """The working copies of one runner (one shard of the pool); see the module docstring."""

    def __init__(self, kv: PagedKV):
        self.kv = kv
        self.copies: dict[tuple[int, ...], DecodeCopy] = {}
        self.owner: dict[int, tuple[int, ...]] = {}   # sequence id -> the copy holding it
        self.gathers = 0                               # copies made, since creation

    def drop(self, seq_id: int) -> None:
        """Forget the copy holding `seq_id` (it runs as a prompt chunk or a verification)."""
        key = self.owner.get(seq_id)
        if key is not None:
            for sid in self.copies.pop(key).ids:
                self.owner.pop(sid, None)

    def step(self, ids: list[int], starts: list[int]) -> DecodeCopy:
        """The copy the decodes `ids` (in batch order, writing at positions `starts`) attend at
        this step: the last one, appended in place, or a new one to gather."""
        key, bs = tuple(ids), self.kv.block_size
        need = max(starts) // bs + 1
        copy = self.copies.get(key)
        if copy is not None and need == copy.blocks and all(s == p + 1 for s, p in zip(starts, copy.starts)):
            copy.starts, copy.fresh, copy.flat = starts, False, None
            keys = need * bs
            copy.append = torch.tensor([b * keys + s for b, s in enumerate(starts)], device=self.kv.k[0].device)
            return copy
        for sid in ids:
            self.drop(sid)
        for k in [k for k in self.copies if any(s not in self.kv.tables for s in k)]:  # finished sequences
            self.drop(k[0])
        flat = self.kv.padded_tables(ids, need).to(self.kv.k[0].device).reshape(-1)
        n_layers = len(self.kv.k)
        copy = DecodeCopy(key, starts, need, [None] * n_layers, [None] * n_layers, True, flat)
        self.copies[key] = copy
        self.owner.update((sid, key) for sid in ids)
        self.gathers += 1
        return copy

    def layer(self, copy: DecodeCopy, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V [kv_heads x B, keys, head_dim] of `layer` for this step, after the new
        K/V [B, kv_heads, head_dim] were written to the pool: gathered from the pool (a fresh
        copy, which then already holds them) or appended to the copy."""
        if copy.fresh:
            copy.k[layer], copy.v[layer] = self.kv.gather_heads(layer, copy.flat, len(copy.ids))
        else:
            kvh = k.shape[1]
            for buf, new in ((copy.k[layer], k), (copy.v[layer], v)):
                buf.view(kvh, -1, buf.shape[-1]).index_copy_(1, copy.append, new.transpose(0, 1))
        return copy.k[layer], copy.v[layer]
