"""Vectorized cost of one pipeline stage (or chunk) per micro-batch: the one source of truth.

`StageModel.evaluate(options, layers, first, last)` takes the memory and recompute options
of a stage as numpy arrays (ZeRO indicators, sequence parallel, selective recompute,
checkpointed layers, offload fractions, gradient width) and returns every time and memory
quantity of the stage as arrays of the same shape. The simulator calls it with scalars for
one plan; the tuner calls it with whole grids of options. Both therefore predict the same.

Overlap rules (design note):
- TP collectives sit on the compute stream's critical path (Megatron-LM) unless
  `overlap_tp_comm`, which hides them behind the layer's GEMMs.
- ZeRO-3 gathers layer i+1's weights while layer i computes: per op, one gather is exposed
  plus whatever part of each later gather outlasts its layer's compute.
- Weight and activation offload traffic runs on PCIe beside the op; only the excess over
  the op's compute stalls it (over the op minus its TP collectives when those use PCIe too). Gradient and optimizer offload happen once per iteration,
  at the optimizer step.
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

KERNELS_PER_LAYER_FWD = 12  # launches outside GEMMs: norms, bias/act fusions, dropout-adds ...
OPTION_KEYS = ("sq", "sel", "flash", "z1", "z2", "z3", "gb", "o_w", "o_g", "o_o", "o_a", "k")


@dataclass(frozen=True)
class Links:
    """Achievable links of the TP, DP and PP groups (rank order tp fastest, then dp, then pp,
    as Megatron-LM lays out its groups)."""

    tp: comm.Link
    dp: comm.Link
    pp: comm.Link

    @classmethod
    def of(cls, cluster: ClusterSpec, tp: int, dp: int) -> Links:
        def link(size: int, stride: int) -> comm.Link:
            return comm.Link.of(cluster, comm.group_level(cluster, size, stride))

        return cls(tp=link(tp, 1), dp=link(dp, tp), pp=link(2, tp * dp))


class StageModel:
    """Costs of stages for fixed (model, cluster, tp, dp, micro-batch, sequence length)."""

    def __init__(self, model: TransformerSpec, cluster: ClusterSpec, tp: int, dp: int,
                 micro_batch_size: int, seq_length: int, overlap_tp_comm: bool = False):
        self.model, self.cluster, self.device = model, cluster, cluster.device
        self.tp, self.dp, self.b, self.s = tp, dp, micro_batch_size, seq_length
        self.overlap_tp_comm = overlap_tp_comm
        self.links = Links.of(cluster, tp, dp)
        self.base = {**model_values(model), "b": micro_batch_size, "s": seq_length, "t": tp, "d": dp}
        self.pcie_bytes_per_s = cluster.host_link_bytes_per_s()

    def costs(self, options: Mapping[str, float | np.ndarray], layers) -> dict[str, np.ndarray]:
        """The compiled symbolic costs for `layers` layers under `options`."""
        return compiled_costs()({**self.base, **options, "L_st": layers, "n_inflight": 1.0})

    # --- one layer ----------------------------------------------------------------------------
    def layer_forward(self, c: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Forward of one layer, one micro-batch: compute, exposed TP comm, its parts."""
        dev, m = self.device, self.model
        gemm = gemm_s(dev, c["gemm_flops_fwd"], min(self.b * self.s, m.hidden_size / self.tp))
        attn = attention_s(dev, c["attention_flops_fwd"]) + memory_bound_s(dev, c["attention_elementwise_bytes_fwd"])
        elem = memory_bound_s(dev, c["elementwise_bytes_fwd"], KERNELS_PER_LAYER_FWD)
        tp = 2 * comm.allreduce_s(c["tp_allreduce_bytes"], self.tp, self.links.tp)
        if self.overlap_tp_comm:
            tp = np.maximum(0.0, tp - gemm)
        return {"compute": gemm + attn + elem, "tp_comm": tp, "attention": attn}

    def embedding(self) -> tuple[dict, dict]:
        """Vocab-parallel embedding lookup (one TP all-reduce) and its gradient scatter-add."""
        out_bytes = 2.0 * self.b * self.s * self.model.hidden_size
        t = memory_bound_s(self.device, 2 * out_bytes, 2)
        ar = comm.allreduce_s(out_bytes, self.tp, self.links.tp)
        return {"compute": t, "tp_comm": ar}, {"compute": 2 * t}

    def lm_head(self, c: Mapping[str, np.ndarray]) -> tuple[dict, dict]:
        """Output GEMM over the vocabulary shard, plus fp32 cross-entropy on the logits."""
        m, dev = self.model, self.device
        gemm = gemm_s(dev, c["lm_head_flops_fwd"], min(self.b * self.s, m.hidden_size))
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

        Returned keys: fwd_* and bwd_* op parts (compute, tp_comm, recompute, zero3_gather,
        offload_stall), grad_sync_s, param_sync_s, optimizer_s, params, and memory in bytes:
        weights, gradients, optimizer, activation_bytes (one micro-batch), recompute_buffer,
        logits (the last stage's transient).
        """
        o = {key: np.asarray(options.get(key, 0.0), dtype=float) for key in OPTION_KEYS}
        layers = np.asarray(layers, dtype=float)
        c = self.costs(o, layers)
        c1 = self.costs(o, 1.0)
        lf = self.layer_forward(c1)
        k = o["k"]
        out = {
            "fwd_compute": layers * lf["compute"], "fwd_tp_comm": layers * lf["tp_comm"],
            "bwd_compute": 2 * layers * lf["compute"], "bwd_tp_comm": layers * lf["tp_comm"],
            "bwd_recompute": k * (lf["compute"] + lf["tp_comm"]) + o["sel"] * (layers - k) * lf["attention"],
        }
        for on, (fwd, bwd) in ((first, self.embedding()), (last, self.lm_head(c1))):
            if on:
                for key, val in fwd.items():
                    out[f"fwd_{key}"] = out[f"fwd_{key}"] + val
                for key, val in bwd.items():
                    out[f"bwd_{key}"] = out[f"bwd_{key}"] + val
        self._zero3(out, o, layers, lf, c1)
        self._offload(out, c)
        params = c["stage_params"] + self.extra_params(first, last)
        self._memory(out, c, c1, params, o["o_a"], first, last)
        self._iteration_extras(out, o, params)
        return {key: np.broadcast_to(val, np.broadcast_shapes(*(np.shape(v) for v in out.values()))) for key, val in out.items()}

    def _zero3(self, out: dict, o: dict, layers, lf: dict, c1: dict) -> None:
        if self.dp == 1:
            out["fwd_zero3_gather"] = out["bwd_zero3_gather"] = np.zeros(())
            return
        gather = comm.allgather_s(c1["zero3_gather_bytes"] * self.dp, self.dp, self.links.dp)
        layer_fwd = lf["compute"] + lf["tp_comm"]
        out["fwd_zero3_gather"] = o["z3"] * (gather + (layers - 1) * np.maximum(0.0, gather - layer_fwd))
        out["bwd_zero3_gather"] = o["z3"] * (gather + (layers - 1) * np.maximum(0.0, gather - 2 * layer_fwd))

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

    def _iteration_extras(self, out: dict, o: dict, params) -> None:
        """Gradient sync, optimizer step and parameter all-gather, once per iteration."""
        d, dev = self.dp, self.device
        grad_bytes = params * o["gb"]
        if d == 1:
            out["grad_sync_s"] = out["param_sync_s"] = np.zeros(())
        else:
            allreduce = comm.allreduce_s(grad_bytes, d, self.links.dp)
            reduce_scatter = comm.reducescatter_s(grad_bytes, d, self.links.dp)
            sharded = o["z1"] > 0
            out["grad_sync_s"] = np.where(sharded, reduce_scatter, allreduce)
            gather = comm.allgather_s(2.0 * params, d, self.links.dp)
            out["param_sync_s"] = np.where(sharded & (o["z3"] == 0), gather, 0.0)
        shard = params * (1 - o["z1"] + o["z1"] / d)
        gpu = memory_bound_s(dev, ADAM_STEP_BYTES * shard * (1 - o["o_o"]), 4)
        cpu = shard * o["o_o"] / self.cluster.host_optimizer_params_per_s
        copies = shard * (o["o_g"] * 4 + o["o_o"] * 2) / self.pcie_bytes_per_s
        out["optimizer_s"] = gpu + cpu + copies
