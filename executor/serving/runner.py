"""The model runner: one forward of a ragged batch through the paged KV cache.

The scheduler hands the runner a step: for each sequence, the tokens to run now (a whole
prompt, a prompt chunk, a recomputed prompt + output, or the one token a decode feeds) and
the position of the first. The runner only executes it (vLLM's split: the scheduler decides,
the block manager owns blocks, the runner runs).

Design note: the batch is flattened, not padded. All the step's tokens form one [T, hidden]
matrix, so every projection and the MLP run once over T rows whatever the mix of prompt
chunks and decodes (a sarathi step of 1 decode token per sequence plus a 500-token chunk
pads nothing). Only attention is per sequence:
- decodes (one new token each) are batched: their K/V are read from a contiguous head-major
  [kv_heads x B, L, head_dim] working copy (L = the longest context, rounded up to a block;
  executor/serving/decode_kv.py: gathered from the blocks when the decoding set changes or L
  grows, appended in place at the other steps), and `decode_attention` (two batched matmuls
  and a float32 softmax, shared with `LlamaDecoder.forward`) attends with an additive key
  mask per row, built once per step. When the decodes are consecutive rows
  (every decode-only step), their queries and outputs are slices, not index copies;
- a prompt that starts at position 0 attends its own fresh K/V (no gather);
- a chunk that continues a prompt (sarathi, or a recompute after preemption) gathers its
  own blocks.
Grouped-query attention stacks the query heads of one K/V head along the query axis, as
`LlamaDecoder.forward` does, so K/V are never repeated. The arithmetic is that of
`LlamaDecoder.forward` (the same `_linear`, RMS norm and rope), which is what makes greedy
output equal the sequential decoder's.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from executor.serving.decode_kv import DecodeCopy, DecodeKV
from executor.serving.model import LlamaDecoder, _linear, decode_attention, key_bias
from executor.serving.paged import PagedKV


@dataclass
class Item:
    """One sequence's part of a step."""

    seq_id: int
    tokens: list[int]
    start: int            # position of tokens[0]
    logits: bool          # whether the last token's logits are needed (it emits a token)
    all_logits: bool = False   # logits of every token (a speculative verification: k + 1 rows)


@dataclass
class Batch:
    """What every layer of one forward needs, worked out once from the step's items."""

    items: list[Item]
    spans: list[tuple[int, int]]          # (first row, rows) of each item in the flat batch
    tokens: torch.Tensor                  # [T] token ids
    slots: torch.Tensor                   # [T] flat KV slots (block * block_size + offset)
    cos: torch.Tensor                     # [T, 1, head_dim]
    sin: torch.Tensor
    decodes: list[int]                    # items of one token, attended together
    rows_d: torch.Tensor | slice          # their rows in the flat batch (a slice when consecutive)
    copy_d: DecodeCopy | None             # their K/V working copy (gathered anew or appended to)
    bias_d: torch.Tensor | None           # their key masks [kv_heads * decodes, 1, keys] (0 / -inf)
    others: list[int]                     # items of several tokens, attended one by one
    last: torch.Tensor                    # rows whose logits are wanted, in item order


class PagedRunner:
    """Runs a step on one shard of the model. On one rank the shard is the whole decoder;
    under tensor/pipeline parallelism (executor/serving/parallel.py) it holds some layers and
    some heads, and `reduce` sums the partial outputs of the row-parallel projections (o,
    down) over the tensor-parallel ranks. `forward` = prepare -> embed -> layers -> head; a
    pipeline stage runs the middle part on activations it receives."""

    def __init__(self, decoder: LlamaDecoder, kv: PagedKV,
                 reduce: Callable[[torch.Tensor], torch.Tensor] | None = None):
        self.decoder, self.kv = decoder, kv
        self.reduce = reduce
        self.decode_kv = DecodeKV(kv)
        self.gather_s = 0.0   # time spent getting K/V into contiguous tensors for attention, since creation

    @torch.inference_mode()
    def forward(self, items: list[Item]) -> torch.Tensor:
        """Logits [rows, vocab] in the order of `items`: one row per item with `logits`, all
        its rows for an item with `all_logits`."""
        batch = self.prepare(items)
        x = self.layers(self.embed(batch), batch)
        return self.head(x[batch.last])

    def prepare(self, items: list[Item]) -> Batch:
        dec, kv = self.decoder, self.kv
        dev, dtype = dec.device, dec.dtype
        tokens, pos, blocks, offsets, spans = [], [], [], [], []
        for it in items:
            n = len(it.tokens)
            b, o = kv.slots(it.seq_id, it.start, n)
            spans.append((len(tokens), n))
            tokens += it.tokens
            pos += range(it.start, it.start + n)
            blocks += b
            offsets += o
        pos_t = torch.tensor(pos, device=dev)
        slots = torch.tensor(blocks, device=dev) * kv.block_size + torch.tensor(offsets, device=dev)
        cos, sin = dec.cos[pos_t][:, None].to(dtype), dec.sin[pos_t][:, None].to(dtype)  # [T, 1, d]
        decodes = [i for i, it in enumerate(items) if len(it.tokens) == 1]
        rows = [spans[i][0] for i in decodes]
        rows_d = (slice(rows[0], rows[0] + len(rows)) if rows and rows == list(range(rows[0], rows[0] + len(rows)))
                  else torch.tensor(rows, device=dev, dtype=torch.long))
        others = [i for i in range(len(items)) if len(items[i].tokens) > 1]
        for i in others:  # a sequence that runs a chunk or a verification leaves its working copy
            self.decode_kv.drop(items[i].seq_id)
        copy_d = bias_d = None
        if decodes:
            starts = [items[i].start for i in decodes]
            copy_d = self.decode_kv.step([items[i].seq_id for i in decodes], starts)
            kvh = dec.cfg.n_kv_heads
            bias = key_bias(torch.tensor(starts, device=dev) + 1, copy_d.blocks * kv.block_size, dtype)
            bias_d = bias[None].expand(kvh, *bias.shape).reshape(kvh * len(decodes), 1, bias.shape[1])
        last = torch.tensor([r for (s, n), it in zip(spans, items) if it.logits
                             for r in (range(s, s + n) if it.all_logits else (s + n - 1,))], device=dev,
                            dtype=torch.long)
        return Batch(items, spans, torch.tensor(tokens, device=dev), slots, cos, sin, decodes, rows_d,
                     copy_d, bias_d, others, last)

    def embed(self, batch: Batch) -> torch.Tensor:
        return self.decoder.embed[batch.tokens]                                # [T, hidden]

    @torch.inference_mode()
    def layers(self, x: torch.Tensor, batch: Batch) -> torch.Tensor:
        """The residual stream [T, hidden] through this shard's layers."""
        dec, cfg, kv = self.decoder, self.decoder.cfg, self.kv
        nh, kvh, g, d = cfg.n_heads, cfg.n_kv_heads, cfg.group, cfg.head_dim
        reduce = self.reduce or (lambda t: t)
        t_all, items, spans, decodes = x.shape[0], batch.items, batch.spans, batch.decodes
        nd = len(decodes)
        only_decodes = nd == len(items) and isinstance(batch.rows_d, slice) and nd == t_all
        for layer, w in enumerate(dec.layers):
            qkv = _linear(dec._rms(x, w.attn_norm), w.qkv)
            # rope on Q and K in one call (they are adjacent columns of the fused projection)
            qk = dec._rope(qkv[:, :(nh + kvh) * d].view(t_all, nh + kvh, d), batch.cos, batch.sin)
            q, k = qk[:, :nh], qk[:, nh:]
            v = qkv[:, (nh + kvh) * d:].view(t_all, kvh, d)
            kv.write(layer, batch.slots, k, v)
            if decodes:
                t0 = time.perf_counter()
                kd, vd = self.decode_kv.layer(batch.copy_d, layer, k[batch.rows_d], v[batch.rows_d])
                self.gather_s += time.perf_counter() - t0
                # sequence-major rows -> head-major, as gathered: row h * nd + b
                qd = q[batch.rows_d].reshape(nd, kvh, g, d).transpose(0, 1).reshape(kvh * nd, g, d)
                od = decode_attention(qd, kd, vd, batch.bias_d)
                od = od.view(kvh, nd, g * d).transpose(0, 1).reshape(nd, nh * d)
            if only_decodes:
                o = od
            else:
                o = torch.empty(t_all, nh * d, dtype=x.dtype, device=x.device)
                if decodes:
                    o[batch.rows_d] = od
                for i in batch.others:
                    o[spans[i][0]:sum(spans[i])] = self._chunk_attention(layer, items[i], spans[i], q, k, v)
            x = x + reduce(_linear(o, w.o))
            gate, up = _linear(dec._rms(x, w.ffn_norm), w.gate_up).chunk(2, dim=-1)
            x = x + reduce(_linear(F.silu(gate) * up, w.down))
        return x

    @torch.inference_mode()
    def head(self, x: torch.Tensor) -> torch.Tensor:
        """Logits [rows, vocab] of final-layer rows [rows, hidden] (final norm, tied LM head)."""
        dec = self.decoder
        if not x.shape[0]:
            return x.new_zeros(0, dec.cfg.vocab)
        # contiguous float32: `_linear` returns a transposed view, and argmax along a strided axis,
        # or of bf16 values, took 4-10x as long (12-17 ms for 64 rows of 49152 here)
        return _linear(dec._rms(x, dec.norm), dec.embed).to(torch.float32, memory_format=torch.contiguous_format)

    def _chunk_attention(self, layer: int, it: Item, span: tuple[int, int], q: torch.Tensor,
                         k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Attention output [n, heads * head_dim] of a prompt (chunk) of n > 1 tokens."""
        cfg, kv = self.decoder.cfg, self.kv
        kvh, g, d = cfg.n_kv_heads, cfg.group, cfg.head_dim
        s, n = span
        dev = q.device
        length = it.start + n
        if it.start == 0:  # a fresh prompt attends its own K/V: the fused causal kernel, no mask
            qh = q[s:s + n].reshape(n, kvh * g, d).transpose(0, 1)[None]              # [1, heads, n, d]
            ki, vi = k[s:s + n].transpose(0, 1)[None], v[s:s + n].transpose(0, 1)[None]
            oi = F.scaled_dot_product_attention(qh, ki, vi, is_causal=True, enable_gqa=True)
            return oi[0].transpose(0, 1).reshape(n, kvh * g * d)
        qi = q[s:s + n].reshape(n, kvh, g, d).permute(1, 2, 0, 3).reshape(1, kvh, g * n, d)
        t0 = time.perf_counter()
        nb = -(-length // kv.block_size)
        ki, vi = kv.gather(layer, torch.tensor([kv.tables[it.seq_id][:nb]], device=dev))
        ki, vi = ki[:, :, :length], vi[:, :, :length]
        self.gather_s += time.perf_counter() - t0
        qpos = torch.arange(it.start, length, device=dev)
        mask = torch.arange(length, device=dev)[None, :] <= qpos[:, None]          # [n, length]
        mask = mask[None, None, None].expand(1, 1, g, n, length).reshape(1, 1, g * n, length)
        oi = F.scaled_dot_product_attention(qi.contiguous(), ki, vi, attn_mask=mask)   # [1, kvh, g*n, d]
        return oi.reshape(kvh, g, n, d).permute(2, 0, 1, 3).reshape(n, kvh * g * d)
