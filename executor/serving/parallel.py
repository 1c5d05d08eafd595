"""Tensor and pipeline parallel layouts of the serving model: which rank holds what, and one step.

A layout is the deployment's `{tp, pp}` (simulator/specs/serving.py). Rank r is stage
`r // tp` and tensor-parallel rank `r % tp` of that stage; rank 0 (stage 0, TP rank 0) also
runs the scheduler, the sampler and the HTTP server (executor/serving/workers.py).

    per layer (Megatron's split)          what a TP rank holds
    ----------------------------          --------------------
    Q, K, V projection (column-parallel)  its K/V heads (kv_heads / tp) and the query heads
                                          of their groups (heads / tp); its KV cache holds
                                          those heads only
    attention                             local heads, as on one rank
    o projection (row-parallel)           the columns of its query heads -> partial sums,
                                          one all-reduce
    gate, up (column-parallel)            ffn / tp columns of each
    down (row-parallel)                   the matching rows -> partial sums, one all-reduce
    embedding, final norm, LM head        whole on every rank (tied; 28 M parameters)

Pipeline stages hold consecutive layers (earlier stages one more when pp does not divide the
layer count). A step runs as `run_step`: its items are cut into up to `pp` micro-batches;
stage 0 embeds each and sends its activations on (non-blocking), so while stage 1 runs
micro-batch 0, stage 0 already runs micro-batch 1; the last stage sends the final-layer rows
whose logits are wanted back to rank 0, which applies the final norm and the tied LM head
(rows of `hidden` floats instead of `vocab`: 576 vs 49152 for SmolLM2) and samples. A step
is still a barrier: the next step's decodes need this step's tokens, so micro-batches overlap
inside a step, not across steps.

Uneven splits. A TP rank holds whole GQA groups (a K/V head and its query heads: no K/V
head is replicated), as evenly as the group count allows, earlier ranks one more
(`even_split`); the MLP columns likewise. SmolLM2-135M (3 K/V heads, 9 query heads, MLP
1536) under tp 2: rank 0 holds groups 0-1 (query heads 0-5), rank 1 group 2 (query heads
6-8), each 768 MLP columns; the row-parallel o projection takes the columns of each rank's
query heads, so the all-reduce sums partial outputs of 6 and 3 heads. The slowest rank (the
one with the most heads) sets the step time, which is what the simulator charges for an
uneven split (simulator/serving/iteration.py: the largest shard).

Which degrees a model allows: 1 <= tp <= the K/V heads (so every rank holds at least one
whole group) and pp at most the layer count. SmolLM2-135M allows tp 1, 2 or 3; anything else
is a SpecError naming `deployment.prefill.tp` (or `.decode.tp` for a re-sharding
deployment's decode layout).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.distributed as dist

from executor.serving.model import LayerWeights, LlamaConfig, LlamaDecoder
from executor.serving.runner import Item, PagedRunner
from simulator.errors import SpecError
from simulator.specs.serving import DeploymentSpec


@dataclass(frozen=True)
class Layout:
    tp: int = 1
    pp: int = 1

    @property
    def world_size(self) -> int:
        return self.tp * self.pp

    def stage(self, rank: int) -> int:
        return rank // self.tp

    def tp_rank(self, rank: int) -> int:
        return rank % self.tp

    def rank(self, stage: int, tp_rank: int) -> int:
        return stage * self.tp + tp_rank

    def layers(self, n_layers: int, stage: int) -> range:
        """Layers of a stage: consecutive, the first `n_layers % pp` stages one more."""
        base, extra = divmod(n_layers, self.pp)
        start = stage * base + min(stage, extra)
        return range(start, start + base + (stage < extra))

    def describe(self) -> str:
        return f"tp{self.tp} pp{self.pp}"


def check_deployment(dep: DeploymentSpec) -> None:
    """SpecError, naming the field, for what the engine does not run: speculation. (dp > 1 runs
    dp replicas of the layout: executor/serving/replicas.py. Re-sharding between a prefill and
    a decode layout needs the seesaw scheduler and a CPU buffer, which the deployment spec
    itself checks: executor/serving/reshard.py runs it.)"""
    if dep.speculation is not None:
        raise SpecError("deployment.speculation", dep.speculation.model_dump(),
                        "not supported by the serving engine yet")


def even_split(n: int, parts: int) -> list[int]:
    """`n` units over `parts` ranks as evenly as possible, earlier ranks one more: 3 over 2 is [2, 1]."""
    base, extra = divmod(n, parts)
    return [base + (i < extra) for i in range(parts)]


def check_layout(tp: int, pp: int, cfg: LlamaConfig, phase: str = "prefill") -> Layout:
    """The layout (tp, pp) on this model, or SpecError naming `deployment.<phase>.tp`/`.pp`."""
    allowed = list(range(1, min(cfg.n_kv_heads, cfg.ffn) + 1))
    if tp not in allowed:
        raise SpecError(f"deployment.{phase}.tp", tp,
                        f"at most the model's {cfg.n_kv_heads} K/V heads ({cfg.n_heads} query heads), so "
                        f"that every rank holds whole GQA groups (uneven splits allowed): one of {allowed}")
    if not 1 <= pp <= cfg.n_layers:
        raise SpecError(f"deployment.{phase}.pp", pp, f"from 1 to the model's {cfg.n_layers} layers")
    return Layout(tp, pp)


def shard_heads(cfg: LlamaConfig, layout: Layout, rank: int) -> range:
    """The K/V heads (whole GQA groups) that `rank` holds."""
    counts, r = even_split(cfg.n_kv_heads, layout.tp), layout.tp_rank(rank)
    return range(sum(counts[:r]), sum(counts[:r + 1]))


def shard_decoder(decoder: LlamaDecoder, layout: Layout, rank: int) -> LlamaDecoder:
    """The part of `decoder` that `rank` holds: its stage's layers, its heads and MLP columns.

    The config of the result counts the local heads, layers and MLP width, so the runner and
    the paged cache work on a shard as on a whole model."""
    cfg, tp, r = decoder.cfg, layout.tp, layout.tp_rank(rank)
    d, g = cfg.head_dim, cfg.group
    kv_range, ffn_counts = shard_heads(cfg, layout, rank), even_split(cfg.ffn, tp)
    kv_heads, kv_first, ffn = len(kv_range), kv_range.start, ffn_counts[r]
    heads = kv_heads * g
    q_rows = slice(kv_first * g * d, (kv_first + kv_heads) * g * d)   # query heads of this rank's groups
    k0, v0 = cfg.n_heads * d, (cfg.n_heads + cfg.n_kv_heads) * d
    kv_rows = slice(kv_first * d, (kv_first + kv_heads) * d)
    f = slice(sum(ffn_counts[:r]), sum(ffn_counts[:r]) + ffn)

    def part(w: LayerWeights) -> LayerWeights:
        qkv = torch.cat([w.qkv[q_rows], w.qkv[k0:v0][kv_rows], w.qkv[v0:][kv_rows]])
        gate, up = w.gate_up.chunk(2)
        return LayerWeights(attn_norm=w.attn_norm, qkv=qkv.contiguous(), o=w.o[:, q_rows].contiguous(),
                            ffn_norm=w.ffn_norm, gate_up=torch.cat([gate[f], up[f]]).contiguous(),
                            down=w.down[:, f].contiguous())

    layers = layout.layers(cfg.n_layers, layout.stage(rank))
    local = replace(cfg, n_layers=len(layers), n_heads=heads, n_kv_heads=kv_heads, ffn=ffn)
    shard = LlamaDecoder(local, decoder.embed, decoder.norm, [part(decoder.layers[i]) for i in layers])
    shard.full_cfg = cfg
    return shard


class Comm:
    """This rank's place in the layout and its process groups (one per stage's TP ranks).

    Every rank must build it, in the same order: `new_group` is itself collective."""

    def __init__(self, layout: Layout, rank: int):
        self.layout, self.rank = layout, rank
        self.stage, self.tp_rank = layout.stage(rank), layout.tp_rank(rank)
        self.tp_group = None
        for s in range(layout.pp):
            ranks = [layout.rank(s, t) for t in range(layout.tp)]
            group = dist.new_group(ranks) if layout.tp > 1 else None
            if s == self.stage:
                self.tp_group = group

    @property
    def first(self) -> bool:
        return self.stage == 0

    @property
    def last(self) -> bool:
        return self.stage == self.layout.pp - 1

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        t = t.contiguous()   # in place: a transposed view (what `_linear` returns) must not be reduced
        dist.all_reduce(t, group=self.tp_group)
        return t


def micro_batches(items: list[Item], n: int) -> list[list[Item]]:
    """`items` cut into up to n consecutive groups of near-equal token counts (every rank cuts
    the same way: the cut depends on the items only)."""
    n = max(1, min(n, len(items)))
    total = sum(len(it.tokens) for it in items)
    out: list[list[Item]] = [[]]
    done = 0
    for it in items:
        if out[-1] and len(out) < n and done >= total * len(out) / n:
            out.append([])
        out[-1].append(it)
        done += len(it.tokens)
    return out


@torch.inference_mode()
def run_step(runner: PagedRunner, comm: Comm, items: list[Item]) -> torch.Tensor | None:
    """This rank's part of one step (see the module docstring); the logits on rank 0."""
    layout, dec = comm.layout, runner.decoder
    hidden = dec.embed.shape[1]
    prev = layout.rank(comm.stage - 1, comm.tp_rank) if not comm.first else None
    nxt = layout.rank(comm.stage + 1, comm.tp_rank) if not comm.last else None
    last_rank = layout.rank(layout.pp - 1, 0)
    pending, outs = [], []
    mbs = micro_batches(items, layout.pp)
    for mb in mbs:
        batch = runner.prepare(mb)
        if comm.first:
            x = runner.embed(batch)
        else:
            x = torch.empty(batch.tokens.shape[0], hidden, dtype=dec.dtype, device=dec.device)
            dist.recv(x, src=prev)
        x = runner.layers(x, batch)
        if not comm.last:
            pending.append((dist.isend(x, dst=nxt), x))
            continue
        rows = x[batch.last].contiguous()
        if comm.rank == 0:
            outs.append(rows)
        elif comm.tp_rank == 0 and rows.shape[0]:
            pending.append((dist.isend(rows, dst=0), rows))
    if comm.rank == 0 and layout.pp > 1:
        for mb in mbs:
            rows = torch.empty(sum(it.logits for it in mb), hidden, dtype=dec.dtype, device=dec.device)
            if rows.shape[0]:  # the last stage sends nothing for a micro-batch without logits
                dist.recv(rows, src=last_rank)
                outs.append(rows)
    for work, _ in pending:
        work.wait()
    if comm.rank != 0:
        return None
    return runner.head(torch.cat(outs)) if outs else dec.embed.new_zeros(0, dec.cfg.vocab)
