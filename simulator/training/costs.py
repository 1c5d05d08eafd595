"""From (model, plan, cluster) to per-op durations and per-stage memory.

Evaluates the compiled symbolic costs for every stage chunk, converts FLOPs and bytes to
seconds with the device's efficiencies, and picks the link level of every collective. The
result feeds the discrete-event engine (`simulator.engine.pipeline`).

Overlap rules (design note):
- TP collectives sit on the compute stream's critical path (Megatron-LM) unless
  `overlap_tp_comm`, which hides them behind the layer's GEMMs.
- ZeRO-3 gathers layer i+1's weights while layer i computes: per op, one gather is exposed
  plus whatever part of each later gather outlasts its layer's compute.
- Weight and activation offload traffic runs on PCIe beside the op; only the excess over
  the op's compute stalls it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from simulator.costs import comm
from simulator.costs.compile import compiled_costs
from simulator.costs.symbols import model_values, plan_values
from simulator.costs.timing import attention_s, gemm_s, memory_bound_s
from simulator.costs.transformer import ADAM_STEP_BYTES
from simulator.engine.pipeline_api import ChunkCost, OpCost, StageCost
from simulator.specs.hardware import ClusterSpec
from simulator.specs.model import TransformerSpec
from simulator.specs.plan import TrainingPlan

KERNELS_PER_LAYER_FWD = 12  # launches outside GEMMs: norms, bias/act fusions, dropout-adds ...


@dataclass(frozen=True)
class Links:
    tp: comm.Link
    dp: comm.Link
    pp: comm.Link

    @classmethod
    def of(cls, plan: TrainingPlan, cluster: ClusterSpec) -> Links:
        # Rank order tp (fastest), dp, pp, as Megatron-LM lays out its groups.
        def link(size, stride):
            return comm.Link.of(cluster, comm.group_level(cluster, size, stride))

        return cls(tp=link(plan.tp, 1), dp=link(plan.dp, plan.tp), pp=link(2, plan.tp * plan.dp))


@dataclass(frozen=True)
class StageMemory:
    """Peak memory of one stage's device, by kind (bytes)."""

    weights: float
    gradients: float
    optimizer: float
    activations: float
    other: float  # recompute buffer, logits

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.activations + self.other


class TrainingCostModel:
    """Per-layer and per-stage costs of one plan, evaluated from the compiled expressions."""

    def __init__(self, model: TransformerSpec, plan: TrainingPlan, cluster: ClusterSpec):
        self.model, self.plan, self.cluster = model, plan, cluster
        self.device = cluster.device
        self.links = Links.of(plan, cluster)
        self.base = {**model_values(model), **plan_values(plan, model)}
        self.layer = compiled_costs()({**self.base, "L_st": 1.0, "n_inflight": 1.0})

    def _v(self, name: str) -> float:
        return float(self.layer[name])

    # --- one layer, one micro-batch ---------------------------------------------------------
    def layer_forward_parts(self) -> dict[str, float]:
        p, dev, m = self.plan, self.device, self.model
        min_dim = min(p.micro_batch_size * p.seq(m), m.hidden_size / p.tp)
        gemm = float(gemm_s(dev, self._v("gemm_flops_fwd"), min_dim))
        attn = float(attention_s(dev, self._v("attention_flops_fwd")))
        attn += float(memory_bound_s(dev, self._v("attention_elementwise_bytes_fwd")))
        elem = float(memory_bound_s(dev, self._v("elementwise_bytes_fwd"), KERNELS_PER_LAYER_FWD))
        tp = 2 * float(comm.allreduce_s(self._v("tp_allreduce_bytes"), p.tp, self.links.tp))
        if p.overlap_tp_comm:
            tp = max(0.0, tp - gemm)
        return {"compute": gemm + attn + elem, "tp_comm": tp, "_attention": attn, "_gemm": gemm}

    def chunk_ops(self, layers: int, checkpointed: int, first: bool, last: bool) -> tuple[OpCost, OpCost]:
        """Forward and backward of one micro-batch through a chunk of `layers` layers."""
        lf = self.layer_forward_parts()
        # Backward GEMM FLOPs are twice the forward's (`layer_flops_bwd`); element-wise and
        # attention kernels are taken at the same 2x.
        fwd = {"compute": layers * lf["compute"], "tp_comm": layers * lf["tp_comm"]}
        bwd = {"compute": 2 * layers * lf["compute"], "tp_comm": layers * lf["tp_comm"]}
        recompute = checkpointed * (lf["compute"] + lf["tp_comm"])
        if self.plan.recompute == "selective":
            recompute += (layers - checkpointed) * lf["_attention"]
        bwd["recompute"] = recompute
        if first:
            self._add(fwd, bwd, self.embedding_parts())
        if last:
            self._add(fwd, bwd, self.lm_head_parts())
        self._add_zero3(fwd, bwd, layers, lf)
        self._add_offload(fwd, bwd, layers, checkpointed)
        return OpCost(fwd), OpCost(bwd)

    @staticmethod
    def _add(fwd: dict, bwd: dict, parts: tuple[dict, dict]) -> None:
        for dst, src in zip((fwd, bwd), parts):
            for k, v in src.items():
                dst[k] = dst.get(k, 0.0) + v

    def embedding_parts(self) -> tuple[dict, dict]:
        """Vocab-parallel embedding lookup (one TP all-reduce) and its gradient scatter-add."""
        p, m = self.plan, self.model
        out_bytes = 2.0 * p.micro_batch_size * p.seq(m) * m.hidden_size
        t = float(memory_bound_s(self.device, 2 * out_bytes, 2))
        ar = float(comm.allreduce_s(out_bytes, p.tp, self.links.tp))
        return {"compute": t, "tp_comm": ar}, {"compute": 2 * t}

    def lm_head_parts(self) -> tuple[dict, dict]:
        """Output GEMM over the vocabulary shard, plus fp32 cross-entropy on the logits."""
        p, m, dev = self.plan, self.model, self.device
        flops = self._v("lm_head_flops_fwd")
        gemm = float(gemm_s(dev, flops, min(p.micro_batch_size * p.seq(m), m.hidden_size)))
        logits = p.micro_batch_size * p.seq(m) * m.vocab_size / p.tp
        ce = float(memory_bound_s(dev, 12.0 * logits, 4))
        return {"compute": gemm + ce}, {"compute": 2 * gemm + ce}

    def _add_zero3(self, fwd: dict, bwd: dict, layers: int, lf: dict) -> None:
        p = self.plan
        if p.zero_stage < 3 or p.dp == 1:
            return
        gather = float(comm.allgather_s(self._v("zero3_gather_bytes") * p.dp, p.dp, self.links.dp))
        layer_fwd = lf["compute"] + lf["tp_comm"]
        fwd["zero3_gather"] = gather + (layers - 1) * max(0.0, gather - layer_fwd)
        bwd["zero3_gather"] = gather + (layers - 1) * max(0.0, gather - 2 * layer_fwd)

    def _add_offload(self, fwd: dict, bwd: dict, layers: int, checkpointed: int) -> None:
        o = self.plan.offload
        if not (o.weights or o.activations):
            return
        stage = self.stage_values(layers, checkpointed, 1)
        pcie = self.cluster.host_link_bytes_per_s()
        moved = float(stage["offload_bytes_per_microbatch"]) / pcie
        for op in (fwd, bwd):
            busy = sum(op.values())
            op["offload_stall"] = max(0.0, moved - busy)

    # --- stage level --------------------------------------------------------------------------
    def stage_values(self, layers: float, checkpointed: float, inflight: float) -> dict[str, np.ndarray]:
        return compiled_costs()({**self.base, "L_st": layers, "k": checkpointed, "n_inflight": inflight})

    def extra_params(self, first: bool, last: bool) -> float:
        """Embedding, position embedding, final norm and LM head parameters on a stage (per TP shard)."""
        m, p = self.model, self.plan
        params = 0.0
        if first:
            params += m.vocab_size * m.hidden_size
            if m.position_embedding == "learned":
                params += p.seq(m) * m.hidden_size
        if last:
            params += (2 if m.norm == "layernorm" else 1) * m.hidden_size
            if not m.tied_embeddings or (p.pp > 1):  # Megatron keeps a tied copy on the last stage
                params += m.vocab_size * m.hidden_size
        return params / p.tp

    def stage_params(self, layers: int, first: bool, last: bool) -> float:
        return float(self.stage_values(layers, 0, 1)["stage_params"]) + self.extra_params(first, last)

    def grad_sync(self, params: float) -> tuple[float, float]:
        """(gradient sync before the step, parameter all-gather after it) for `params` per shard."""
        p = self.plan
        grad_bytes = params * {"bf16": 2, "fp16": 2, "fp32": 4}[p.gradient_dtype]
        if p.dp == 1:
            return 0.0, 0.0
        if p.zero_stage == 0:
            return float(comm.allreduce_s(grad_bytes, p.dp, self.links.dp)), 0.0
        rs = float(comm.reducescatter_s(grad_bytes, p.dp, self.links.dp))
        ag = 0.0 if p.zero_stage == 3 else float(comm.allgather_s(2.0 * params, p.dp, self.links.dp))
        return rs, ag

    def optimizer_s(self, params: float) -> float:
        """Adam step on the device's shard (HBM-bound), CPU share, and offload copies."""
        p, dev = self.plan, self.device
        shard = params / (p.dp if p.zero_stage >= 1 else 1)
        o = p.offload
        gpu = float(memory_bound_s(dev, ADAM_STEP_BYTES * shard * (1 - o.optimizer), 4))
        cpu = shard * o.optimizer / self.cluster.host_optimizer_params_per_s
        pcie = self.cluster.host_link_bytes_per_s()
        copies = (shard * o.gradients * 4 + shard * o.optimizer * 2) / pcie
        return gpu + cpu + copies

    def stage_memory(self, layers: int, checkpointed: int, inflight_activation_bytes: float,
                     first: bool, last: bool) -> StageMemory:
        vals = self.stage_values(layers, checkpointed, 0)
        # Embedding and LM head parameters follow the same ZeRO and offload rules as a layer's.
        per_layer = self.stage_values(1, 0, 0)
        scale = self.extra_params(first, last) / float(per_layer["stage_params"])

        def state(name: str) -> float:
            return float(vals[name]) + scale * float(per_layer[name])

        weights, grads, optim = (state(n) for n in ("stage_weight_bytes", "stage_grad_bytes", "stage_optimizer_bytes"))
        act = inflight_activation_bytes * (1 - self.plan.offload.activations)
        other = float(vals["recompute_buffer_bytes"])
        if last:
            p, m = self.plan, self.model
            other += 6.0 * p.micro_batch_size * p.seq(m) * m.vocab_size / p.tp  # 16-bit + fp32 logits
        return StageMemory(weights, grads, optim, act, other)

    def p2p_s(self) -> float:
        if self.plan.pp == 1:
            return 0.0
        return float(comm.p2p_s(self._v("pp_p2p_bytes"), self.links.pp))

    def build_stages(self) -> list[StageCost]:
        """StageCost for every pipeline stage, chunks split evenly over virtual stages."""
        p, m = self.plan, self.model
        v = p.virtual_stages
        stages = []
        for i, (n, k) in enumerate(zip(p.stage_layers(m), p.stage_checkpointed(m))):
            chunk_layers = [n // v + (1 if c < n % v else 0) for c in range(v)]
            chunk_ckpt = [k // v + (1 if c < k % v else 0) for c in range(v)]
            chunks, params_total = [], 0.0
            for c, (cl, ck) in enumerate(zip(chunk_layers, chunk_ckpt)):
                first, last = (i == 0 and c == 0), (i == p.pp - 1 and c == v - 1)
                fwd, bwd = self.chunk_ops(cl, ck, first, last)
                params = self.stage_params(cl, first, last)
                params_total += params
                act = float(self.stage_values(cl, ck, 1)["stage_activation_bytes"])
                chunks.append(ChunkCost(fwd, bwd, cl, self.grad_sync(params)[0], act))
            stages.append(StageCost(chunks, self.optimizer_s(params_total), self.grad_sync(params_total)[1]))
        return stages
