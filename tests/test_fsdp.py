"""Sharded data parallel (ZeRO-3 / FSDP / HSDP) and collectives across nodes.

The byte counts here are independent of `simulator/training/fsdp.py`: parameters are counted
from the model's tensor shapes, every collective's traffic by running its ring step by step,
and the simulator is then made compute-free (a device with absurd peaks and no latencies) so
that its exposed data-parallel time must equal those bytes over the link bandwidth.
"""

from __future__ import annotations

import math

import pytest

from simulator.costs import comm
from simulator.specs.catalog import load_cluster, load_device, load_model
from simulator.training import simulate_training

GB = 1e9


# --- independent counts -------------------------------------------------------------------
def ring_allgather_bytes_sent(total_bytes: float, n: int) -> float:
    """Run a ring all-gather chunk by chunk; return the bytes one rank sends (and check the
    ring really leaves every rank with every chunk)."""
    have = [{r} for r in range(n)]
    sent = [0.0] * n
    for step in range(n - 1):
        for r in range(n):
            chunk = (r - step) % n  # the chunk rank r received last step (its own at step 0)
            assert chunk in have[r]
            have[(r + 1) % n].add(chunk)
            sent[r] += total_bytes / n
    assert all(len(h) == n for h in have)
    assert len(set(sent)) == 1
    return sent[0]


def ring_allreduce_bytes_sent(total_bytes: float, n: int) -> float:
    """A ring all-reduce is a reduce-scatter then an all-gather (each a ring of n-1 steps)."""
    return 2 * ring_allgather_bytes_sent(total_bytes, n)


def llama_layer_params(m) -> int:
    """One Llama layer from its tensor shapes: q, k, v, o, gate, up, down, two RMSNorms."""
    head = m.hidden_size // m.num_attention_heads
    q = o = m.hidden_size * m.hidden_size
    k = v = m.hidden_size * m.num_kv_heads * head
    mlp = 3 * m.hidden_size * m.ffn_hidden_size
    return q + k + v + o + mlp + 2 * m.hidden_size


def llama_root_params(m) -> int:
    """Embedding, final norm and (untied) output layer: FSDP's root unit."""
    return 2 * m.vocab_size * m.hidden_size + m.hidden_size


# --- a compute-free cluster ---------------------------------------------------------------
def instant_cluster(nodes: int, per_node: int, intra_GBps=100.0, inter_GBps=10.0) -> dict:
    """Devices whose compute takes ~0 s and collectives no latency, at link efficiency 1."""
    dev = load_device("a100-80gb").to_dict()
    dev["peak_tflops"] = {"bf16": 1e9, "fp16": 1e9, "fp8": 2e9}
    dev["hbm_bandwidth_GBps"] = 1e9
    dev["memory_GiB"] = 1e6
    e = dev["efficiency"]
    e.update(kernel_overhead_us=0.0, gemm_half_dim=0.0)
    e["intra_node"] = {"alpha_us": 0.0, "efficiency": 1.0}
    e["inter_node"] = {"alpha_us": 0.0, "efficiency": 1.0}
    return {"name": "instant", "device": dev, "num_nodes": nodes, "devices_per_node": per_node,
            "intra_node_bandwidth_GBps": intra_GBps, "inter_node_bandwidth_GBps": inter_GBps,
            "host_link_bandwidth_GBps": 1e9}


def fsdp_plan(dp: int, **kw) -> dict:
    base = {"dp": dp, "micro_batch_size": 1, "global_batch_size": dp, "zero_stage": 3,
            "gradient_dtype": "fp32", "flash_attention": True}
    return {**base, **kw}


def exposed_dp_s(cluster: dict, plan: dict) -> float:
    r = simulate_training("llama-debug", cluster, plan)
    return r.breakdown["dp_comm"]


def counted_s(n_shard: int, gathers_per_mb: int, microbatches: int, bw: float, *, replicas: int = 1,
              replica_bw: float = 1.0, reduces: int | None = None, root_gathers: int | None = None) -> float:
    """Seconds of every collective of one iteration, from ring-counted bytes."""
    m = load_model("llama-debug")
    layer, root = llama_layer_params(m), llama_root_params(m)
    reduces = microbatches if reduces is None else reduces
    root_gathers = microbatches if root_gathers is None else root_gathers
    gather = ring_allgather_bytes_sent(2 * layer, n_shard)  # bf16 weights
    scatter = ring_allgather_bytes_sent(4 * layer, n_shard)  # fp32 gradients, same ring
    root_gather, root_scatter = ring_allgather_bytes_sent(2 * root, n_shard), ring_allgather_bytes_sent(4 * root, n_shard)
    sent = m.num_layers * (gathers_per_mb * microbatches * gather + reduces * scatter)
    sent += root_gathers * root_gather + reduces * root_scatter
    seconds = sent / bw
    if replicas > 1:
        shard_grads = 4 * (m.num_layers * layer + root) / n_shard
        seconds += reduces * ring_allreduce_bytes_sent(shard_grads, replicas) / replica_bw
    return seconds


# --- bytes: one node and many, dp 2 / 8 / 64 ----------------------------------------------
@pytest.mark.parametrize("nodes,per_node,dp,bw_GBps", [
    (1, 2, 2, 100.0),     # inside one node: NVLink
    (1, 8, 8, 100.0),
    (8, 1, 8, 10.0),      # one GPU per node: every byte through its own NIC
    (64, 1, 64, 10.0),
    (8, 8, 64, 80.0),     # 8 ranks per node: the node's 8 NICs carry the ring (8 x 10 GB/s)
])
def test_fsdp_moves_two_gathers_and_one_reduce_scatter_per_layer(nodes, per_node, dp, bw_GBps):
    got = exposed_dp_s(instant_cluster(nodes, per_node), fsdp_plan(dp))
    assert got == pytest.approx(counted_s(dp, 2, 1, bw_GBps * GB), rel=1e-3)


def test_node_aggregate_bandwidth_is_capped_by_nvlink():
    # 8 ranks per node at 20 GB/s per NIC would be 160 GB/s; NVLink carries only 100.
    got = exposed_dp_s(instant_cluster(8, 8, inter_GBps=20.0), fsdp_plan(64))
    assert got == pytest.approx(counted_s(64, 2, 1, 100.0 * GB), rel=1e-3)


def test_keeping_weights_after_forward_drops_the_backward_gather():
    got = exposed_dp_s(instant_cluster(8, 1), fsdp_plan(8, reshard_after_forward=False))
    assert got == pytest.approx(counted_s(8, 1, 1, 10 * GB), rel=1e-3)


def test_recompute_gathers_again_only_where_the_engine_does():
    cluster = instant_cluster(8, 1)
    fsdp2 = exposed_dp_s(cluster, fsdp_plan(8, recompute="full"))
    deepspeed = exposed_dp_s(cluster, fsdp_plan(8, recompute="full", regather_for_recompute=True))
    assert fsdp2 == pytest.approx(counted_s(8, 2, 1, 10 * GB), rel=1e-3)
    assert deepspeed == pytest.approx(counted_s(8, 3, 1, 10 * GB), rel=1e-3)


def test_gradient_accumulation_without_resharding_gathers_once_per_iteration():
    m = 4
    cluster = instant_cluster(8, 1)
    every = exposed_dp_s(cluster, fsdp_plan(8, global_batch_size=8 * m))
    once = exposed_dp_s(cluster, fsdp_plan(8, global_batch_size=8 * m, reshard_between_microbatches=False))
    assert every == pytest.approx(counted_s(8, 2, m, 10 * GB), rel=1e-3)
    assert once == pytest.approx(counted_s(8, 1, 1, 10 * GB, reduces=1, root_gathers=1), rel=1e-3)


def test_hsdp_gathers_inside_the_node_and_all_reduces_across_replicas():
    # 8 nodes x 8: shard groups of 8 on NVLink (100 GB/s); 8 replicas, one rank per node each.
    got = exposed_dp_s(instant_cluster(8, 8), fsdp_plan(64, dp_shard=8))
    want = counted_s(8, 2, 1, 100 * GB, replicas=8, replica_bw=10 * GB)
    assert got == pytest.approx(want, rel=1e-3)


def test_fp8_all_gather_halves_the_gathered_weight_bytes():
    cluster = instant_cluster(8, 1)
    bf16 = exposed_dp_s(cluster, fsdp_plan(8, reshard_after_forward=False, precision="fp8"))
    fp8 = exposed_dp_s(cluster, fsdp_plan(8, reshard_after_forward=False, precision="fp8", fp8_all_gather=True))
    m = load_model("llama-debug")
    norms = 2 * m.hidden_size
    saved = m.num_layers * ring_allgather_bytes_sent(llama_layer_params(m) - norms, 8) / (10 * GB)
    assert bf16 - fp8 == pytest.approx(saved, rel=1e-3)


# --- the 175B example of issue 9: a hand count ------------------------------------------
def test_gpt3_175b_zero3_on_384_gpus_matches_the_hand_count():
    """tp 1, pp 1, dp 384 (48 nodes x 8 A100), mbs 4, gbs 1536: one micro-batch.

    Hand count, per layer (96 layers): 12h^2 + 13h parameters -> W = 3.62 GB of bf16 weights.
    Ring over 384 ranks, 8 per node: the node's eight 25 GB/s NICs carry it together,
    8 x 25 x 0.85 = 170 GB/s (below NVLink's 300 x 0.75), (383/384) W per gather. With the
    recompute regather (DeepSpeed): forward gather, recompute gather, backward gather, and a
    reduce-scatter of bf16 gradients. Forward exposes the first gather plus each later
    gather's excess over a layer's forward; backward the first gathers, the last
    reduce-scatter, and the excess of (2 gathers + reduce-scatter) over a layer's backward
    + recompute. Plus the root unit (embedding and LM head) gathered and reduce-scattered
    once, exposed.
    """
    plan = {"tp": 1, "pp": 1, "dp": 384, "micro_batch_size": 4, "global_batch_size": 1536,
            "zero_stage": 3, "recompute": "full", "regather_for_recompute": True}
    cluster = load_cluster("48x8xa100-80gb")
    r = simulate_training("gpt3-175b", cluster, plan)
    m = load_model("gpt3-175b")
    h, L = m.hidden_size, m.num_layers
    W = 2 * (12 * h * h + 13 * h)
    root = 2 * (m.vocab_size * h * 2 + m.seq_length * h + 2 * h)  # word emb, untied head copy, positions, norm
    bw = min(8 * 25 * 0.85, 300 * 0.75) * GB
    eff = cluster.device.efficiency
    lat = (383 - 47) * eff.intra_node.alpha_us * 1e-6 + 47 * eff.inter_node.alpha_us * 1e-6
    G = 383 / 384 * W / bw + lat
    R = G  # bf16 gradients: the same bytes and steps
    Gr = 383 / 384 * root / bw + lat
    fwd_layer = r.breakdown["compute"] / (3 * L)  # backward = 2 x forward
    bwd_layer = 2 * fwd_layer + r.breakdown["recompute"] / L
    fwd = G + Gr + (L - 1) * max(0.0, G - fwd_layer)
    bwd = 2 * G + R + Gr + (L - 1) * max(0.0, 2 * G + R - bwd_layer)
    hand = fwd + bwd
    total_moved = 4 * L * 383 / 384 * W / bw  # 3 gathers + 1 reduce-scatter of 350 GB
    assert r.breakdown["dp_comm"] == pytest.approx(hand, abs=1.0)
    assert r.breakdown["dp_comm"] < 0.5 * total_moved  # most of it overlaps compute
    assert r.iteration_time_s < 100  # was 12,556 s when every gather moved dp x the bytes


# --- collectives across many nodes --------------------------------------------------------
def test_ring_latency_grows_with_ranks_and_tree_with_log_nodes():
    cluster = load_cluster("128x8xh100")
    small = 8.0  # bytes: pure latency
    rings = [comm.ring_allreduce_s(small, n, comm.group_link(cluster, n, 1)) for n in (16, 64, 256, 1024)]
    trees = [comm.tree_allreduce_s(small, n, comm.group_link(cluster, n, 1)) for n in (16, 64, 256, 1024)]
    assert rings == sorted(rings) and rings[-1] / rings[0] > 30  # ~linear in n
    assert trees == sorted(trees) and trees[-1] / trees[0] < 5  # ~log(nodes)
    assert comm.allreduce_s(small, 1024, comm.group_link(cluster, 1024, 1)) == pytest.approx(trees[-1])


def test_large_all_reduce_across_nodes_takes_the_ring():
    cluster = load_cluster("4x8xh100")
    link = comm.group_link(cluster, 32, 1)
    big = 4 * GB
    assert comm.allreduce_s(big, 32, link) == pytest.approx(comm.ring_allreduce_s(big, 32, link))


def test_a_30MB_gather_over_1000_ranks_is_latency_bound():
    cluster = load_cluster("125x8xh100")
    link = comm.group_link(cluster, 1000, 1)
    t = comm.allgather_s(30e6, 1000, link)
    bandwidth_part = 999 / 1000 * 30e6 / link.bandwidth_bytes_per_s
    assert t > 2 * bandwidth_part


def test_group_links_span_the_right_nodes():
    cluster = load_cluster("4x8xh100")
    assert comm.group_link(cluster, 8, 1).nodes == 1
    assert comm.group_link(cluster, 4, 8).nodes == 4  # one rank per node: per-GPU NIC
    per_gpu = comm.group_link(cluster, 4, 8).bandwidth_bytes_per_s
    assert per_gpu == pytest.approx(50 * GB * cluster.device.efficiency.inter_node.efficiency)
    assert comm.group_link(cluster, 32, 1).bandwidth_bytes_per_s > 4 * per_gpu
    assert math.isclose(comm.group_link(cluster, 16, 2).nodes, 4)


# --- memory and plan checks ---------------------------------------------------------------
def test_keeping_weights_after_forward_holds_them_whole():
    sharded = simulate_training("llama-debug", "8xa100-80gb", fsdp_plan(8)).stages[0].memory
    kept = simulate_training("llama-debug", "8xa100-80gb", fsdp_plan(8, reshard_after_forward=False)).stages[0].memory
    assert kept["weights"] == pytest.approx(8 * sharded["weights"], rel=1e-6)
    assert kept["gradients"] == pytest.approx(sharded["gradients"], rel=1e-6)


@pytest.mark.parametrize("bad,field", [
    ({"dp_shard": 3}, "dp_shard"),
    ({"dp_shard": 4, "zero_stage": 2}, "dp_shard"),
    ({"fp8_all_gather": True}, "fp8_all_gather"),
])
def test_bad_fsdp_fields_are_named(bad, field):
    from simulator.errors import SpecError
    from simulator.specs.plan import TrainingPlan

    with pytest.raises((SpecError, ValueError), match=field):
        TrainingPlan.model_validate(fsdp_plan(8, **bad))


def test_fp8_needs_a_device_with_fp8_peaks():
    with pytest.raises(ValueError, match="fp8"):
        simulate_training("llama-debug", "8xa100-80gb", fsdp_plan(8, precision="fp8"))


# --- torchtitan's kernels: per-op selective checkpointing, eager element-wise ops ----------
def test_per_op_checkpointing_reruns_every_other_matmul():
    """torchtitan's policy keeps wq, wv, w1, w2 outputs and re-runs wk, wo, w3 (Llama 3 8B
    shapes: h 4096, KV width 1024, FFN 14336) plus every element-wise op."""
    from simulator.specs.plan import TrainingPlan
    from simulator.training.costs import TrainingCostModel

    h, kv, f = 4096, 1024, 14336
    share = (h * kv + h * h + h * f) / (2 * h * h + 2 * h * kv + 3 * h * f)
    plan = TrainingPlan.model_validate(fsdp_plan(8, recompute="selective_op"))
    costs = TrainingCostModel(load_model("llama-3-8b"), plan, load_cluster("8xh100"))
    assert costs.stage_model.op_recompute_share() == pytest.approx(share)
    op = simulate_training("llama-3-8b", "8xh100", fsdp_plan(8, recompute="selective_op")).breakdown
    attn_only = simulate_training("llama-3-8b", "8xh100", fsdp_plan(8, recompute="selective")).breakdown
    assert op["recompute"] > 0.75 * share * op["compute"] / 3  # the re-run GEMMs (compute also holds the LM head)
    assert op["recompute"] < (share + 0.15) * op["compute"] / 3  # plus element-wise ops, not attention
    assert op["compute"] == pytest.approx(attn_only["compute"])


def test_eager_element_wise_ops_cost_more_than_fused_ones_and_only_in_hbm_time():
    fused = simulate_training("llama-3-8b", "8xh100", fsdp_plan(8)).breakdown
    eager = simulate_training("llama-3-8b", "8xh100", fsdp_plan(8, fused_elementwise=False)).breakdown
    extra = eager["compute"] - fused["compute"]
    # Llama 3 8B, 8192 tokens: ~438 KB per token per layer moved again (fp32 norms, RoPE,
    # head-major copies, the SwiGLU product), forward and twice in backward, at 0.75 x 3.35 TB/s.
    m = load_model("llama-3-8b")
    h, kv, f = m.hidden_size, 1024, m.ffn_hidden_size
    per_token = 60 * h + 24 * (h + kv) + 4 * (2 * h + 2 * kv) + 2 * f
    launches = 30 * 4e-6  # one launch per unfused op, 4 us each
    want = 3 * m.num_layers * (8192 * per_token / (0.75 * 3350e9) + launches)
    assert extra == pytest.approx(want, rel=0.05)
