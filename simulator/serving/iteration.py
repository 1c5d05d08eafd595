"""Cost of one engine step of an inference replica: the same symbolic model as training.

A step runs a batch of sequences, each contributing `new_tokens` (a prefill chunk, or 1 for
decode) on top of `context` tokens already cached. Per layer and device (one TP shard):
- GEMMs: the longer of reading the layer's weights and computing 2 x tokens x weights
  (roofline; Seesaw App. A), so small-batch decode is bound by weight reads;
- attention: causal score/value FLOPs of the new tokens against their context (with the
  diagonal blocks a blocked causal kernel computes in full, `attention_half_seq`), and the
  cached K/V they read (4 h_kv d bytes per token per layer, FORMULAS.md);
- element-wise kernels (fused, or one per op in an eager engine, `EngineSpec.eager`: the extra
  passes at the device's simple-op bandwidth, their launches counted in the engine's host time
  per step, which for simtune's engine is a whole step of it measured at tiny widths) and two
  TP all-reduces of the step's activations;
- the LM head for the sequences that produce a token, on the last stage;
- an uneven TP split (whole GQA groups over fewer devices than groups: SmolLM2's 3 over 2)
  costs its largest shard, the attention and the MLP each (`shard_degrees`): the slowest
  device sets the step;
- the engine's CPU time per step (scheduling, input preparation, sampling, output
  processing): a fixed part, a part per sequence and a part per context token
  (`engine_overhead.py`), from the deployment's `engine`, or the device's
  `step_overhead_us` without one. Small-batch decode would be far too fast without it.
Pipeline parallel replicas split the batch into pp micro-batches that flow through the
stages back to back (vLLM's virtual engines): each stage processes all of them per step,
and a step lasts at least one micro-batch's trip through every stage (a lone prompt crosses
pp stages one after another, so pp does not cut its latency). That assumes the micro-batches
of consecutive steps overlap, so that the last stage never waits for the pipeline to fill.
An engine whose steps do not overlap (`EngineSpec.pipeline_overlap: false`, as simtune's own
engine, executor/serving: the next decode needs this step's tokens) fills and drains the
pipeline every step: the last stage starts once the first micro-batch has crossed the pp - 1
stages before it, then runs every micro-batch, so a step adds (pp - 1) x the first
micro-batch's stage time to the last stage's busy time (with m micro-batches of equal time t:
(m + pp - 1) t, the GPipe bubble; 1.5x the busy time for 2 micro-batches on 2 stages), each
micro-batch after the first adds a stage's share of the engine's host time per step (it is
dispatched by itself), and the last stage's final rows travel back to the first, where the
engine samples.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from simulator.costs import comm
from simulator.costs.compile import compiled_costs
from simulator.costs.symbols import model_values
from simulator.costs.timing import attention_efficiency, gemm_calls_s, gemm_s, memory_bound_s
from simulator.serving.engine_overhead import EngineOverhead
from simulator.specs.hardware import ClusterSpec
from simulator.specs.model import TransformerSpec
from simulator.specs.serving import EngineSpec, Parallel

KERNELS_PER_LAYER = 10  # launches outside GEMMs per layer and step
# `Efficiency.attention` is a fraction of peak for the score count of Megatron-LM's convention,
# the full s x s square of a causal prompt (simulator/specs/profile.py: a measured causal
# kernel's rate, which counts the visible half, is doubled to that convention). A step here
# counts the pairs a query actually attends (`BatchSums.attention_pairs`: n c + n (n + 1) / 2),
# half that square for a whole prompt; in the efficiency's convention each visible pair of a
# prompt or chunk is two. Without this, prompt attention ran at twice the measured kernel's
# rate: SmolLM2 prefills of 512 tokens on the measured CPU profile were 1.5x faster than the
# real decoder's (profile decode table), verifications of 8 drafts 1.3x. One-query decode
# attention has its own measured efficiency (`attention_decode`, no causal half) and is
# counted as is.
FULL_SQUARE_PER_VISIBLE_PAIR = 2.0


@dataclass(frozen=True, slots=True)
class Work:
    """One sequence's part of a step."""

    new_tokens: int
    context: int
    logits: int  # tokens whose logits are computed: 1 for decode or a prompt's last chunk,
    #              k + 1 when verifying k drafts, 0 for a chunk inside a prompt


@dataclass(frozen=True, slots=True)
class BatchSums:
    """What a micro-batch's step time depends on: integer sums over its works.

    The context-dependent fields may be int arrays, one entry per step of a run of decode
    steps; the arithmetic on them is the arithmetic of a single step, so a run's step times
    have the bits of the steps computed one at a time. Integer sums are exact, so the order
    of the works does not change them.
    """

    sequences: int
    new_tokens: int
    logits: int
    context: int | np.ndarray           # sum of the contexts
    attention_pairs: int | np.ndarray   # (query, key) pairs of causal attention: n * c + n (n + 1) / 2 per work
    decode_pairs: int | np.ndarray      # those pairs of the one-token (decode) works
    chunk_tokens: int = 0               # new tokens of the works of several (prompts, chunks, verifications)
    chunks: int = 0                     # those works

    @classmethod
    def of(cls, works: list[Work]) -> BatchSums:
        return cls(len(works), sum(w.new_tokens for w in works), sum(w.logits for w in works),
                   sum(w.context for w in works),
                   sum(w.new_tokens * w.context + w.new_tokens * (w.new_tokens + 1) // 2 for w in works),
                   sum(w.context + 1 for w in works if w.new_tokens == 1),
                   sum(w.new_tokens for w in works if w.new_tokens > 1),
                   sum(1 for w in works if w.new_tokens > 1))

    def __add__(self, other: BatchSums) -> BatchSums:
        return BatchSums(*(getattr(self, f) + getattr(other, f) for f in self.__slots__))

    @classmethod
    def decode(cls, sequences: int, context, new_tokens: int = 1, logits: int = 1) -> BatchSums:
        """`sequences` works of `new_tokens` each (k + 1 when verifying k drafts) whose contexts
        sum to `context` (an int, or an array over steps)."""
        pairs = new_tokens * context + sequences * (new_tokens * (new_tokens + 1) // 2)
        several = new_tokens > 1
        return cls(sequences, sequences * new_tokens, sequences * logits, context, pairs,
                   0 * pairs if several else pairs, sequences * new_tokens if several else 0,
                   sequences if several else 0)


def _max(a, b):
    """max of two floats, or elementwise of arrays of step times."""
    return np.maximum(a, b) if isinstance(a, np.ndarray) or isinstance(b, np.ndarray) else max(a, b)


def shard_degrees(model: TransformerSpec, tp: int) -> tuple[float, float]:
    """The effective TP degrees (attention, MLP) of a split's largest shard: `whole / largest
    shard`. Up to num_kv_heads, a device holds whole GQA groups, as evenly as they split (3
    groups on tp 2: the larger shard holds 2, so attention costs as at tp 1.5); above it, K/V
    heads are replicated and the query heads split evenly (tp). MLP columns split as evenly
    as they can. An even split gives (tp, tp): the costs of an even split are unchanged."""
    kv, ffn = model.num_kv_heads, model.ffn_hidden_size
    attn = tp if tp > kv or kv % tp == 0 else kv / -(-kv // tp)
    mlp = tp if ffn % tp == 0 else ffn / -(-ffn // tp)
    return attn, mlp


class IterationModel:
    """Step times of one replica layout (tp, pp) for a model on a cluster's device."""

    def __init__(self, model: TransformerSpec, cluster: ClusterSpec, layout: Parallel,
                 engine: EngineSpec | None = None):
        self.model, self.cluster, self.layout = model, cluster, layout
        self.device = cluster.device
        t = layout.tp
        self.t_attn, self.t_mlp = shard_degrees(model, t)

        def costs(degree: float) -> dict:
            return compiled_costs()({**model_values(model), "t": degree, "b": 1, "s": 1, "d": 1, "flash": 1.0,
                                     "sq": 0.0, "L_st": 1.0})

        c = costs(self.t_attn)
        self.weight_bytes = float(c["layer_weight_bytes"])
        self.flops_per_token = float(c["gemm_flops_fwd"])  # b = s = 1: per token
        self.kv_bytes_per_token = float(c["kv_bytes_per_token"])
        self.elementwise_per_token = float(c["elementwise_bytes_fwd"])
        self.eager_per_token = float(c["eager_extra_bytes_fwd"]) if engine is not None and engine.eager else 0.0
        if self.t_mlp != self.t_attn:  # uneven: attention at its largest shard, the MLP at its own
            cm = costs(self.t_mlp)
            mlp = float(cm["layer_weight_bytes"] - cm["attention_weight_bytes"])
            self.weight_bytes = float(c["attention_weight_bytes"]) + mlp
            self.flops_per_token = float(cm["gemm_flops_fwd"]) * self.weight_bytes / float(cm["layer_weight_bytes"])
            self.elementwise_per_token = float(cm["elementwise_bytes_fwd"])
            self.eager_per_token = float(cm["eager_extra_bytes_fwd"]) if self.eager_per_token else 0.0
        level = comm.group_level(cluster, t, 1)
        self.tp_link = comm.Link.of(cluster, level)
        self.pp_link = comm.Link.of(cluster, comm.group_level(cluster, 2, t))
        self.layers_per_stage = model.num_layers / layout.pp
        eff = self.device.efficiency
        self.hbm = self.device.hbm_bandwidth_bytes_per_s * eff.memory_bound
        self.weight_hbm = self.device.hbm_bandwidth_bytes_per_s * (eff.weight_stream or eff.memory_bound)
        self.kv_hbm = self.device.hbm_bandwidth_bytes_per_s * (eff.kv_read or eff.memory_bound)
        self.overhead = EngineOverhead.of(engine, eff.step_overhead_us)
        self.overlapped = engine is None or engine.pipeline_overlap
        self._parts: dict[int, tuple[float, float, float]] = {}
        self._heads: dict[int, float] = {}
        self._decode_parts: dict[tuple[int, int], tuple] = {}
        self._peak_flops = self.device.peak_flops
        # a blocked causal kernel computes whole blocks on the diagonal: about half a block of
        # keys more per query row of a prompt, chunk or verification (`timing.attention_s`:
        # eff(s) = attention * s / (s + attention_half_seq) is s (s + h) for a prompt of s, that
        # is h / 2 pairs more per row); 0 on a device without a measured kernel. A measured
        # curve holds them in its rate at each length instead (`_chunk_efficiency`).
        self.diagonal_keys = 0.0 if eff.attention_curve else eff.attention_half_seq / 2.0
        self._chunk_effs: dict[tuple[int, int], float] = {}

    # --- per device memory ------------------------------------------------------------------
    def weight_bytes_per_device(self) -> float:
        """Weights held by one device: its layers' shards plus the embedding / LM head share."""
        m, lay = self.model, self.layout
        embed = m.vocab_size * m.hidden_size * 2.0 * (1 if m.tied_embeddings else 2) / (lay.tp * lay.pp)
        return self.layers_per_stage * self.weight_bytes + embed

    def kv_bytes_per_token_per_device(self) -> float:
        return self.kv_bytes_per_token * self.layers_per_stage

    # --- time ---------------------------------------------------------------------------------
    def _token_parts(self, tokens: int) -> tuple[float, float, float]:
        """The parts of a layer's time that depend only on the step's new tokens: GEMMs (with
        their calls), element-wise kernels, TP all-reduces. Kept per token count: a serving run
        asks for the same few counts again and again."""
        parts = self._parts.get(tokens)
        if parts is None:
            m, dev, t = self.model, self.device, self.layout.tp
            flops = tokens * self.flops_per_token
            min_dim = min(tokens, m.hidden_size / self.t_attn)
            compute = gemm_s(dev, flops, min_dim)
            weights = self.weight_bytes / self.weight_hbm + 4.0 * tokens * m.hidden_size / self.hbm
            elementwise = memory_bound_s(dev, tokens * self.elementwise_per_token, KERNELS_PER_LAYER)
            if self.eager_per_token:  # their launches: in the engine's host time per step (below)
                elementwise += memory_bound_s(dev, tokens * self.eager_per_token, simple=True)
            tp = 2 * comm.allreduce_s(2.0 * tokens * m.hidden_size, t, self.tp_link)
            calls = gemm_calls_s(dev, m.gemms_per_layer, streaming=weights > compute)
            parts = self._parts[tokens] = (max(compute, weights) + calls, elementwise, float(tp))
        return parts

    def _lm_head_s(self, sequences: int) -> float:
        head = self._heads.get(sequences)
        if head is None:
            head = self._heads[sequences] = self._lm_head_uncached_s(sequences)
        return head

    def _lm_head_uncached_s(self, sequences: int) -> float:
        m, dev, t = self.model, self.device, self.layout.tp
        if sequences == 0:
            return 0.0
        flops = 2.0 * sequences * m.hidden_size * m.vocab_size / t
        compute = gemm_s(dev, flops, min(sequences, m.hidden_size))
        weights = 2.0 * m.hidden_size * m.vocab_size / t / self.weight_hbm
        return max(compute, weights) + gemm_calls_s(dev, 1, streaming=weights > compute)

    def _micro_batch_stage_s(self, b: BatchSums):
        """(one stage's layers time, the last stage's LM head time) for one micro-batch."""
        # causal attention: each new token attends to the context and the new tokens before it
        scale = 4.0 * (self.model.hidden_size / self.t_attn)
        gemms, elementwise, tp = self._token_parts(b.new_tokens)
        kv = self.kv_bytes_per_token * (b.context + b.new_tokens)
        attention = (self._attention_s(scale * (b.attention_pairs - b.decode_pairs + self.diagonal_keys * b.chunk_tokens),
                                       scale * b.decode_pairs, b.chunk_tokens, b.chunks)
                     + kv / self.kv_hbm)
        return self.layers_per_stage * (gemms + attention + elementwise + tp), self._lm_head_s(b.logits)

    def step_s(self, works: list[Work]) -> float:
        """Time of one engine step over `works` (every sequence advances once)."""
        if not works:
            return 0.0
        pp = self.layout.pp
        groups = [works[i::pp] for i in range(pp)] if pp > 1 else [works]
        return float(self.batch_step_s([BatchSums.of(g) for g in groups if g]))

    def batch_step_s(self, groups: list[BatchSums]):
        """Time of a step whose pp micro-batches (the non-empty ones) have these sums; with
        array sums, of every step of a run at once (`decode_run_sums`), to the same bits."""
        pp = self.layout.pp
        # the last stage is busy for every micro-batch; with fewer micro-batches than stages,
        # the slowest one's trip through all pp stages is longer than that
        busy, trip, max_tokens, fill = 0.0, 0.0, 0, None
        for group in groups:
            layers_s, head_s = self._micro_batch_stage_s(group)
            busy = busy + (layers_s + head_s)
            trip = _max(trip, pp * layers_s + head_s)
            max_tokens = max(max_tokens, group.new_tokens)
            fill = (pp - 1) * layers_s if fill is None else fill
        if not self.overlapped:
            busy = busy + fill + self._dispatch_s(len(groups))
        handoff = self._handoff_s(max_tokens, sum(g.logits for g in groups))
        sequences = sum(g.sequences for g in groups)
        context_tokens = sum(g.context + g.new_tokens for g in groups)
        return _max(busy, trip) + handoff + self.overhead.seconds_of(sequences, context_tokens)

    def _dispatch_s(self, micro_batches: int) -> float:
        """An engine whose steps do not overlap prepares and dispatches each micro-batch's layers
        on each stage by itself (simtune's engine: `run_step` loops over them): every micro-batch
        after the first adds a stage's share of the host time of a step to the last stage."""
        return (micro_batches - 1) * self.overhead.step_s / self.layout.pp

    def _handoff_s(self, max_tokens: int, logits: int) -> float:
        """Pipeline messages on a step's critical path: the activations of the largest
        micro-batch from each stage to the next, and, in an engine whose steps do not overlap,
        the final rows of the logits back from the last stage to the first (simtune's engine
        samples on rank 0; the next step cannot start before they arrive)."""
        pp, h = self.layout.pp, self.model.hidden_size
        if pp == 1:
            return 0.0
        back = 0.0 if self.overlapped else float(comm.p2p_s(2.0 * logits * h, self.pp_link))
        return (pp - 1) * float(comm.p2p_s(2.0 * max_tokens * h, self.pp_link)) + back

    def decode_step_s(self, groups: list[tuple[int, int]], new_tokens: int = 1) -> float:
        """`batch_step_s` of a decode step on Python numbers: micro-batches of (sequences, sum of
        their contexts), each sequence computing `new_tokens` with that many logits. The same
        operations in the same order (so the same bits) with the per-token parts looked up
        once per micro-batch: a fast-forward run of a few steps calls this once a step."""
        parts = self._decode_parts.get((groups[0][0], new_tokens))
        busy, trip, max_tokens, sequences, context_tokens, fill = 0.0, 0.0, 0, 0, 0, None
        pp = self.layout.pp
        half = new_tokens * (new_tokens + 1) // 2
        for n, context in groups:
            if parts is None or parts[0] != n:
                parts = self._decode_part(n, new_tokens)
            _, tokens, scale, gemms, elementwise, tp, head_s = parts
            pairs = new_tokens * context + n * half
            decode_pairs = pairs if new_tokens == 1 else 0 * pairs
            diagonal = 0.0 if new_tokens == 1 else self.diagonal_keys * tokens
            kv = self.kv_bytes_per_token * (context + tokens)
            attention = (self._attention_s(scale * (pairs - decode_pairs + diagonal), scale * decode_pairs,
                                           0 if new_tokens == 1 else tokens, 0 if new_tokens == 1 else n)
                         + kv / self.kv_hbm)
            layers_s = self.layers_per_stage * (gemms + attention + elementwise + tp)
            busy = busy + (layers_s + head_s)
            trip = max(trip, pp * layers_s + head_s)
            max_tokens = max(max_tokens, tokens)
            sequences += n
            context_tokens += context + tokens
            fill = (pp - 1) * layers_s if fill is None else fill
        if not self.overlapped:
            busy = busy + fill + self._dispatch_s(len(groups))
        handoff = self._handoff_s(max_tokens, sequences * new_tokens)
        return max(busy, trip) + handoff + self.overhead.seconds_of(sequences, context_tokens)

    def _decode_part(self, n: int, new_tokens: int) -> tuple:
        """What a decode micro-batch of n sequences costs apart from its context."""
        tokens = n * new_tokens
        parts = (n, tokens, 4.0 * (self.model.hidden_size / self.t_attn), *self._token_parts(tokens),
                 self._lm_head_s(n * new_tokens))
        self._decode_parts[(n, new_tokens)] = parts
        return parts

    def _attention_s(self, flops, decode_flops, chunk_tokens: int = 0, chunks: int = 0):
        """Attention core: `flops` (4 x head width x the (query, key) pairs) of the prompts,
        chunks and verifications, `chunk_tokens` new tokens in `chunks` works, at the efficiency of
        their mean length (`_chunk_efficiency`), and `decode_flops` of one-query decodes at the
        decode efficiency (`timing.attention_s`, with the device's numbers looked up once)."""
        e = self.device.efficiency
        return ((FULL_SQUARE_PER_VISIBLE_PAIR * flops) / self._chunk_efficiency(chunk_tokens, chunks)
                + decode_flops / (e.attention_decode or e.attention)) / self._peak_flops

    def _chunk_efficiency(self, chunk_tokens: int, chunks: int) -> float:
        """Attention efficiency of `chunks` multi-token works of `chunk_tokens` new tokens in all:
        on a device with a measured curve, the curve at their mean length (a step's prompts are
        few and alike; a verification's k + 1 are all equal), else the device's `attention`
        (the diagonal blocks are then extra pairs, `diagonal_keys`)."""
        e = self.device.efficiency
        if not chunks or not e.attention_curve:
            return e.attention
        key = (chunk_tokens, chunks)
        eff = self._chunk_effs.get(key)
        if eff is None:
            eff = self._chunk_effs[key] = attention_efficiency(self.device, chunk_tokens / chunks)
        return eff

    def prefill_s(self, prompt_tokens: int) -> float:
        """A lone prefill of one prompt: the bare time-to-first-token of an idle replica."""
        return self.step_s([Work(prompt_tokens, 0, True)])
