"""Vectorized cost of one pipeline stage (or chunk) per micro-batch: the one source of truth.

`StageModel.evaluate(options, layers, first, last)` takes the memory and recompute options
of a stage as numpy arrays (ZeRO indicators, sequence parallel, selective recompute,
checkpointed layers, offload fractions, gradient width, sharded-data-parallel behaviour)
and returns every time and memory quantity of the stage as arrays of the same shape. The
simulator calls it with scalars for one plan; the tuner calls it with whole grids of options.
Both therefore predict the same.

Overlap rules (design note):
- TP collectives sit on the compute stream's critical path (Megatron-LM) unless
  `overlap_tp_comm`, which hides them behind the layer's GEMMs.
- Sharded data parallel (ZeRO-3 / FSDP) is described in `fsdp.py`: per layer and
  micro-batch a forward all-gather, a backward all-gather (unless the weights were kept
  after forward), and a backward reduce-scatter, prefetched one layer ahead on their own
  stream; only what does not fit behind compute is charged to the op.
- Weight and activation offload traffic runs on PCIe beside the op; only the excess over
  the op's compute stalls it (over the op minus its TP collectives when those use PCIe too).
  Gradient and optimizer offload happen once per iteration, at the optimizer step.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from simulator.costs import comm
from simulator.costs.compile import compiled_costs
from simulator.costs.symbols import model_values
from simulator.costs.timing import attention_s, gemm_s, memory_bound_s
from simulator.costs.transformer import ADAM_STEP_BYTES
from simulator.specs.hardware import ClusterSpec
from simulator.specs.model import TransformerSpec
from simulator.training.fsdp import FSDP_OPTION_KEYS, fsdp_costs, fsdp_memory_options

KERNELS_PER_LAYER_FWD = 12  # launches outside GEMMs: norms, bias/act fusions, dropout-adds ...
EAGER_EXTRA_KERNELS_FWD = 30  # the same ops unfused, one launch per op (eager PyTorch)
NON_SYMBOLIC_KEYS = ("sop", "eg", *FSDP_OPTION_KEYS)
OPTION_KEYS = ("sq", "sel", "flash", "z1", "z2", "z3", "gb", "o_w", "o_g", "o_o", "o_a", "k", *NON_SYMBOLIC_KEYS)
"""Option arrays of a stage. `sop` (0/1): torchtitan's per-op selective checkpointing; `eg`
(0/1): element-wise ops run eagerly, one kernel each, instead of fused."""


@dataclass(frozen=True)
class Links:
    """Achievable links of the TP, DP and PP groups (rank order tp fastest, then dp, then pp,
    as Megatron-LM lays out its groups). Under HSDP the data-parallel ranks split into shard
    groups of `dp_shard` consecutive ranks (`shard`) and replica groups across them
    (`replicate`); without it `shard` is the whole DP group and `replicate` is unused."""

    tp: comm.Link
    dp: comm.Link
    pp: comm.Link
    shard: comm.Link
    replicate: comm.Link

    @classmethod
    def of(cls, cluster: ClusterSpec, tp: int, dp: int, dp_shard: int | None = None) -> Links:
        shard = dp_shard or dp

        def link(size: int, stride: int) -> comm.Link:
            return comm.group_link(cluster, size, stride)

        return cls(tp=link(tp, 1), dp=link(dp, tp), pp=link(2, tp * dp), shard=link(shard, tp),
                   replicate=link(dp // shard, tp * shard))


class StageModel:
    """Costs of stages for fixed (model, cluster, tp, dp, micro-batch, sequence length)."""

    def __init__(self, model: TransformerSpec, cluster: ClusterSpec, tp: int, dp: int,
                 micro_batch_size: int, seq_length: int, overlap_tp_comm: bool = False,
                 dp_shard: int | None = None, num_microbatches: int = 1):
        self.model, self.cluster, self.device = model, cluster, cluster.device
        self.tp, self.dp, self.b, self.s = tp, dp, micro_batch_size, seq_length
        self.dp_shard = dp_shard or dp  # ZeRO shards model states over this many ranks
        self.replicas = dp // self.dp_shard
        self.num_microbatches = num_microbatches
        self.overlap_tp_comm = overlap_tp_comm
        self.links = Links.of(cluster, tp, dp, dp_shard)
        self.base = {**model_values(model), "b": micro_batch_size, "s": seq_length, "t": tp, "d": self.dp_shard}
        self.pcie_bytes_per_s = cluster.host_link_bytes_per_s()

    def costs(self, options: Mapping[str, float | np.ndarray], layers) -> dict[str, np.ndarray]:
        """The compiled symbolic costs for `layers` layers under `options`."""
        return compiled_costs()({**self.base, **options, "L_st": layers, "n_inflight": 1.0})

    # --- one layer ----------------------------------------------------------------------------
    def layer_forward(self, c: Mapping[str, np.ndarray], o: Mapping[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
        """Forward of one layer, one micro-batch: compute, exposed TP comm, its parts.

        With fp8 linears (option `f8`) the GEMMs run against the device's fp8 peak at the same
        achievable fraction, and every linear casts its input and weight to fp8 first (a
        tensorwise amax read, then a read and a 1-byte write: 5 bytes per 16-bit element)."""
        dev, m = self.device, self.model
        f8 = 0.0 if o is None else o["f8"]
        gemm = gemm_s(dev, c["gemm_flops_fwd"], min(self.b * self.s, m.hidden_size / self.tp), m.gemms_per_layer)
        if np.any(f8):
            gemm = gemm * (1 - f8 + f8 * dev.peak_flops / self._fp8_peak())
            cast = 5.0 * (c["linear_input_elements_fwd"] + c["layer_weight_bytes"] / 2)
            gemm = gemm + f8 * memory_bound_s(dev, cast, 7)
        core = attention_s(dev, c["attention_flops_fwd"], seq=self.s)
        attn = core + memory_bound_s(dev, c["attention_elementwise_bytes_fwd"])
        elem = memory_bound_s(dev, c["elementwise_bytes_fwd"], KERNELS_PER_LAYER_FWD)
        if o is not None and np.any(o["eg"]):
            elem = elem + o["eg"] * memory_bound_s(dev, c["eager_extra_bytes_fwd"], EAGER_EXTRA_KERNELS_FWD, simple=True)
        tp = 2 * comm.allreduce_s(c["tp_allreduce_bytes"], self.tp, self.links.tp)
        if self.overlap_tp_comm:
            tp = np.maximum(0.0, tp - gemm)
        return {"compute": gemm + attn + elem, "tp_comm": tp, "attention": attn, "attention_core": core,
                "gemm": gemm, "elementwise": elem}

    def op_recompute_share(self) -> float:
        """Share of a layer's forward GEMM FLOPs that torchtitan's per-op selective
        checkpointing re-runs: its policy (torchtitan `activation_checkpoint.py`,
        `_custom_policy`) saves the outputs of attention and of every other matmul, counted in
        forward order (wq, wk, wv, wo, then w1, w3, w2 for SwiGLU), and re-runs everything else,
        so wk, wo and w3 (GELU: fc2) are recomputed, with every element-wise op."""
        m = self.model
        h, f = m.hidden_size, m.ffn_hidden_size
        kv = h * m.num_kv_heads // m.num_attention_heads
        mats = [h * h, h * kv, h * kv, h * h] + ([h * f, h * f, f * h] if m.mlp_matrices == 3 else [h * f, f * h])
        return sum(mats[1::2]) / sum(mats)

    def _fp8_peak(self) -> float:
        peak = self.device.peak_tflops.get("fp8")
        if peak is None:
            raise ValueError(f"precision fp8: {self.device.name} has no fp8 peak (peak_tflops lists {sorted(self.device.peak_tflops)})")
        return peak * 1e12

    def embedding(self) -> tuple[dict, dict]:
        """Vocab-parallel embedding lookup (one TP all-reduce) and its gradient scatter-add."""
        out_bytes = 2.0 * self.b * self.s * self.model.hidden_size
        t = memory_bound_s(self.device, 2 * out_bytes, 2)
        ar = comm.allreduce_s(out_bytes, self.tp, self.links.tp)
        return {"compute": t, "tp_comm": ar}, {"compute": 2 * t}

    def lm_head(self, c: Mapping[str, np.ndarray]) -> tuple[dict, dict]:
        """Output GEMM over the vocabulary shard, plus fp32 cross-entropy on the logits."""
        m, dev = self.model, self.device
        gemm = gemm_s(dev, c["lm_head_flops_fwd"], min(self.b * self.s, m.hidden_size), 1)
        ce = memory_bound_s(dev, 12.0 * self.b * self.s * m.vocab_size / self.tp, 4)
        return {"compute": gemm + ce}, {"compute": 2 * gemm + ce}

    def extra_params(self, first: bool, last: bool) -> float:
        """Embedding, position embedding, final norm and LM head parameters (per TP shard)."""
        m = self.model
        params = 0.0
        if first:
            params += m.vocab_size * m.hidden_size
            if m.position_embedding == "learned":
                params += self.s * m.hidden_size
        if last:
            params += (2 if m.norm == "layernorm" else 1) * m.hidden_size
            if not m.tied_embeddings or not first:  # Megatron keeps a tied copy on the last stage
                params += m.vocab_size * m.hidden_size
        return params / self.tp

    # --- a stage or chunk ---------------------------------------------------------------------
    def evaluate(self, options: Mapping[str, float | np.ndarray], layers, first: bool, last: bool) -> dict[str, np.ndarray]:
        """Per micro-batch op times, per-iteration extras and memory of a stage (or chunk).

        Returned keys: fwd_* and bwd_* op parts (compute, tp_comm, recompute, zero3_comm,
        offload_stall), grad_sync_s, param_sync_s, optimizer_s, params, and memory in bytes:
        weights, gradients, optimizer, activation_bytes (one micro-batch), recompute_buffer,
        logits (the last stage's transient), zero3_buffer (gathered weights and unsharded
        gradients in flight).
        """
        o = {key: np.asarray(options.get(key, 0.0), dtype=float) for key in OPTION_KEYS}
        layers = np.asarray(layers, dtype=float)
        mem = {**{key: v for key, v in o.items() if key not in NON_SYMBOLIC_KEYS}, **fsdp_memory_options(o)}
        c = self.costs(mem, layers)
        c1 = self.costs(mem, 1.0)
        lf = self.layer_forward(c1, o)
        k = o["k"]
        out = {
            "fwd_compute": layers * lf["compute"], "fwd_tp_comm": layers * lf["tp_comm"],
            # a flash kernel's backward recomputes the scores: 2.5x its forward FLOPs, not 2x
            # (five matmuls against two; Dao 2023, FlashAttention-2, Sec. 4.1)
            "bwd_compute": layers * (2 * lf["compute"] + 0.5 * o["flash"] * lf["attention_core"]),
            "bwd_tp_comm": layers * lf["tp_comm"],
            "bwd_recompute": k * (lf["compute"] + lf["tp_comm"]) + (o["sel"] - o["sop"]) * (layers - k) * lf["attention"]
            + o["sop"] * (layers - k) * (self.op_recompute_share() * lf["gemm"] + lf["elementwise"]),
        }
        for on, (fwd, bwd) in ((first, self.embedding()), (last, self.lm_head(c1))):
            if on:
                for key, val in fwd.items():
                    out[f"fwd_{key}"] = out[f"fwd_{key}"] + val
                for key, val in bwd.items():
                    out[f"bwd_{key}"] = out[f"bwd_{key}"] + val
        extra = self.extra_params(first, last)
        params = c["stage_params"] + extra
        out.update(fsdp_costs(self, o, layers, c1, lf, extra, out["bwd_recompute"]))
        self._offload(out, c)
        self._memory(out, c, c1, params, o["o_a"], first, last)
        self._iteration_extras(out, o, params)
        return {key: np.broadcast_to(val, np.broadcast_shapes(*(np.shape(v) for v in out.values()))) for key, val in out.items()}

    def _offload(self, out: dict, c: dict) -> None:
        moved = c["offload_bytes_per_microbatch"] / self.pcie_bytes_per_s
        # Where GPUs talk to each other over PCIe, TP collectives occupy the same link as the
        # offload copies: those can only hide behind the rest of the op.
        shares_link = self.cluster.intra_node_link == "pcie" and self.tp > 1
        for op in ("fwd", "bwd"):
            busy = sum(v for key, v in out.items() if key.startswith(op + "_"))
            if shares_link:
                busy = busy - out[f"{op}_tp_comm"]
            out[f"{op}_offload_stall"] = np.maximum(0.0, moved - busy)

    def _memory(self, out: dict, c: dict, c1: dict, params, o_a, first: bool, last: bool) -> None:
        # Embedding and LM head parameters follow the same ZeRO and offload rules as a layer's.
        scale = self.extra_params(first, last) / c1["stage_params"]
        for name, key in (("weights", "stage_weight_bytes"), ("gradients", "stage_grad_bytes"),
                          ("optimizer", "stage_optimizer_bytes")):
            out[name] = c[key] + scale * c1[key]
        out["activation_bytes"] = c["stage_activation_bytes"] * (1 - o_a)  # kept on the device
        out["host_states"] = c["stage_host_state_bytes"] + scale * c1["stage_host_state_bytes"]
        out["host_activation_bytes"] = c["stage_activation_bytes"] * o_a
        out["recompute_buffer"] = c["recompute_buffer_bytes"]
        logits = 6.0 * self.b * self.s * self.model.vocab_size / self.tp  # 16-bit + fp32 logits
        out["logits"] = np.asarray(logits if last else 0.0)
        out["params"] = params

    def sharded_grad_sync_s(self, grad_bytes):
        """Reduce-scatter `grad_bytes` of gradients over the shard group, then all-reduce each
        rank's shard across the HSDP replicas (nothing to all-reduce without HSDP)."""
        links = self.links
        return (comm.reducescatter_s(grad_bytes, self.dp_shard, links.shard)
                + comm.allreduce_s(grad_bytes / self.dp_shard, self.replicas, links.replicate))

    def _iteration_extras(self, out: dict, o: dict, params) -> None:
        """Gradient sync, optimizer step and parameter all-gather, once per iteration.

        ZeRO-3 synchronizes gradients per micro-batch inside the backward (`fsdp.py`); ZeRO-0
        all-reduces them over dp; ZeRO-1/2 reduce-scatter them over the shard group (and
        all-reduce the shard across HSDP replicas) and all-gather the updated weights."""
        n, links = self.dp_shard, self.links
        grad_bytes = params * o["gb"]
        if self.dp == 1:
            out["grad_sync_s"] = out["param_sync_s"] = np.zeros(())
        else:
            allreduce = comm.allreduce_s(grad_bytes, self.dp, links.dp)
            reduce_scatter = self.sharded_grad_sync_s(grad_bytes)
            sharded = o["z1"] > 0
            out["grad_sync_s"] = np.where(o["z3"] > 0, 0.0, np.where(sharded, reduce_scatter, allreduce))
            gather = comm.allgather_s(2.0 * params, n, links.shard)
            out["param_sync_s"] = np.where(sharded & (o["z3"] == 0), gather, 0.0)
        shard = params * (1 - o["z1"] + o["z1"] / n)
        gpu = memory_bound_s(self.device, ADAM_STEP_BYTES * shard * (1 - o["o_o"]), 4)
        cpu = shard * o["o_o"] / self.cluster.host_optimizer_params_per_s
        copies = shard * (o["o_g"] * 4 + o["o_o"] * 2) / self.pcie_bytes_per_s
        out["optimizer_s"] = gpu + cpu + copies
