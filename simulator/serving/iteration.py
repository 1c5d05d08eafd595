"""Cost of one engine step of an inference replica: the same symbolic model as training.

A step runs a batch of sequences, each contributing `new_tokens` (a prefill chunk, or 1 for
decode) on top of `context` tokens already cached. Per layer and device (one TP shard):
- GEMMs: the longer of reading the layer's weights and computing 2 x tokens x weights
  (roofline; Seesaw App. A), so small-batch decode is bound by weight reads;
- attention: causal score/value FLOPs of the new tokens against their context, and the
  cached K/V they read (4 h_kv d bytes per token per layer, FORMULAS.md);
- element-wise kernels and two TP all-reduces of the step's activations;
- the LM head for the sequences that produce a token, on the last stage;
- the engine's CPU time per step (scheduling, input preparation, sampling, output
  processing): a fixed part, a part per sequence and a part per context token
  (`engine_overhead.py`), from the deployment's `engine`, or the device's
  `step_overhead_us` without one. Small-batch decode would be far too fast without it.
Pipeline parallel replicas split the batch into pp micro-batches that flow through the
stages back to back (vLLM's virtual engines): each stage processes all of them per step,
and a step lasts at least one micro-batch's trip through every stage (a lone prompt crosses
pp stages one after another, so pp does not cut its latency).
"""

from __future__ import annotations

from dataclasses import dataclass

from simulator.costs import comm
from simulator.costs.compile import compiled_costs
from simulator.costs.symbols import model_values
from simulator.costs.timing import attention_s, gemm_calls_s, gemm_s, memory_bound_s
from simulator.serving.engine_overhead import EngineOverhead
from simulator.specs.hardware import ClusterSpec
from simulator.specs.model import TransformerSpec
from simulator.specs.serving import EngineSpec, Parallel

KERNELS_PER_LAYER = 10  # launches outside GEMMs per layer and step


@dataclass(frozen=True, slots=True)
class Work:
    """One sequence's part of a step."""

    new_tokens: int
    context: int
    logits: int  # tokens whose logits are computed: 1 for decode or a prompt's last chunk,
    #              k + 1 when verifying k drafts, 0 for a chunk inside a prompt


class IterationModel:
    """Step times of one replica layout (tp, pp) for a model on a cluster's device."""

    def __init__(self, model: TransformerSpec, cluster: ClusterSpec, layout: Parallel,
                 engine: EngineSpec | None = None):
        self.model, self.cluster, self.layout = model, cluster, layout
        self.device = cluster.device
        t = layout.tp
        c = compiled_costs()({**model_values(model), "t": t, "b": 1, "s": 1, "d": 1, "flash": 1.0,
                              "sq": 0.0, "L_st": 1.0})
        self.weight_bytes = float(c["layer_weight_bytes"])
        self.flops_per_token = float(c["gemm_flops_fwd"])  # b = s = 1: per token
        self.kv_bytes_per_token = float(c["kv_bytes_per_token"])
        self.elementwise_per_token = float(c["elementwise_bytes_fwd"])
        level = comm.group_level(cluster, t, 1)
        self.tp_link = comm.Link.of(cluster, level)
        self.pp_link = comm.Link.of(cluster, comm.group_level(cluster, 2, t))
        self.layers_per_stage = model.num_layers / layout.pp
        eff = self.device.efficiency
        self.hbm = self.device.hbm_bandwidth_bytes_per_s * eff.memory_bound
        self.weight_hbm = self.device.hbm_bandwidth_bytes_per_s * (eff.weight_stream or eff.memory_bound)
        self.kv_hbm = self.device.hbm_bandwidth_bytes_per_s * (eff.kv_read or eff.memory_bound)
        self.overhead = EngineOverhead.of(engine, eff.step_overhead_us)

    # --- per device memory ------------------------------------------------------------------
    def weight_bytes_per_device(self) -> float:
        """Weights held by one device: its layers' shards plus the embedding / LM head share."""
        m, lay = self.model, self.layout
        embed = m.vocab_size * m.hidden_size * 2.0 * (1 if m.tied_embeddings else 2) / (lay.tp * lay.pp)
        return self.layers_per_stage * self.weight_bytes + embed

    def kv_bytes_per_token_per_device(self) -> float:
        return self.kv_bytes_per_token * self.layers_per_stage

    # --- time ---------------------------------------------------------------------------------
    def _layer_s(self, tokens: int, attn_flops: float, kv_read_bytes: float, decode_attn_flops: float = 0.0) -> float:
        m, dev, t = self.model, self.device, self.layout.tp
        flops = tokens * self.flops_per_token
        min_dim = min(tokens, m.hidden_size / t)
        compute = gemm_s(dev, flops, min_dim)
        weights = self.weight_bytes / self.weight_hbm + 4.0 * tokens * m.hidden_size / self.hbm
        attention = attention_s(dev, attn_flops, decode_attn_flops) + kv_read_bytes / self.kv_hbm
        elementwise = memory_bound_s(dev, tokens * self.elementwise_per_token, KERNELS_PER_LAYER)
        tp = 2 * comm.allreduce_s(2.0 * tokens * m.hidden_size, t, self.tp_link)
        calls = gemm_calls_s(dev, m.gemms_per_layer, streaming=weights > compute)
        return max(compute, weights) + calls + attention + elementwise + float(tp)

    def _lm_head_s(self, sequences: int) -> float:
        m, dev, t = self.model, self.device, self.layout.tp
        if sequences == 0:
            return 0.0
        flops = 2.0 * sequences * m.hidden_size * m.vocab_size / t
        compute = gemm_s(dev, flops, min(sequences, m.hidden_size))
        weights = 2.0 * m.hidden_size * m.vocab_size / t / self.weight_hbm
        return max(compute, weights) + gemm_calls_s(dev, 1, streaming=weights > compute)

    def _micro_batch_stage_s(self, works: list[Work]) -> tuple[float, float, int]:
        """(one stage's layers time, the last stage's LM head time, tokens) for one micro-batch."""
        h, t = self.model.hidden_size, self.layout.tp
        tokens = sum(w.new_tokens for w in works)
        # causal attention: each new token attends to the context and the new tokens before it
        flops = [4.0 * (h / t) * w.new_tokens * (w.context + (w.new_tokens + 1) / 2) for w in works]
        decode = sum(f for f, w in zip(flops, works) if w.new_tokens == 1)
        kv = self.kv_bytes_per_token * sum(w.context + w.new_tokens for w in works)
        layer = self._layer_s(tokens, sum(flops) - decode, kv, decode)
        logits = sum(w.logits for w in works)
        return self.layers_per_stage * layer, self._lm_head_s(logits), tokens

    def step_s(self, works: list[Work]) -> float:
        """Time of one engine step over `works` (every sequence advances once)."""
        if not works:
            return 0.0
        pp = self.layout.pp
        groups = [works[i::pp] for i in range(pp)] if pp > 1 else [works]
        # the last stage is busy for every micro-batch; with fewer micro-batches than stages,
        # the slowest one's trip through all pp stages is longer than that
        busy, trip, max_tokens = 0.0, 0.0, 0
        for group in groups:
            if group:
                layers_s, head_s, tokens = self._micro_batch_stage_s(group)
                busy += layers_s + head_s
                trip = max(trip, pp * layers_s + head_s)
                max_tokens = max(max_tokens, tokens)
        handoff = (pp - 1) * float(comm.p2p_s(2.0 * max_tokens * self.model.hidden_size, self.pp_link))
        return max(busy, trip) + handoff + self.overhead.seconds(works)

    def prefill_s(self, prompt_tokens: int) -> float:
        """A lone prefill of one prompt: the bare time-to-first-token of an idle replica."""
        return self.step_s([Work(prompt_tokens, 0, True)])
