"""Serving simulator: idle-replica latencies, KV accounting under preemption, Sarathi's token
budget, Seesaw's transition count, pipeline step costs, deployment errors, report and trace."""

from __future__ import annotations

import json
import math
import re

import pytest

from simulator.errors import SpecError
from simulator.serving import simulate
from simulator.serving.iteration import BatchSums, IterationModel, Work
from simulator.serving.kv_cache import BlockManager
from simulator.serving.schedulers import StaticScheduler
from simulator.serving.seesaw import KV_WATERMARK
from simulator.serving.sequence import Seq
from simulator.serving.simulate import simulate_serving
from simulator.serving.workload import Request
from simulator.specs.catalog import load_cluster, load_model
from simulator.specs.hardware import GB
from simulator.specs.serving import DeploymentSpec, EngineSpec, Parallel

MODEL = "llama-2-7b"


def fixed(n: int, input_tokens: int, output_tokens: int, **fields) -> dict:
    """A workload of `n` requests of fixed lengths (offline unless `arrival` is given)."""
    return {"num_requests": n, "input_tokens": {"value": input_tokens},
            "output_tokens": {"value": output_tokens}, **fields}


def trace_boxes(path) -> list[dict]:
    return [e for e in json.loads(path.read_text())["traceEvents"] if e["ph"] == "X"]


@pytest.fixture
def serve(monkeypatch):
    """simulate_serving that also returns the sequences, to check every token was generated."""
    seen = {}

    def build_report(model, cluster, deployment, workload, seqs, stats):
        seen["seqs"] = seqs
        return real_build_report(model, cluster, deployment, workload, seqs, stats)

    real_build_report = simulate.build_report
    monkeypatch.setattr(simulate, "build_report", build_report)

    def run(*args, **kwargs):
        report = simulate_serving(*args, **kwargs)
        return report, seen["seqs"]

    return run


class CheckedBlockManager(BlockManager):
    """A block manager that checks both pools after every change and counts swaps."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.peak_gpu_blocks = 0
        self.swaps_out = 0

    def check(self) -> None:
        assert 0 <= self.num_used_gpu_blocks <= self.num_gpu_blocks, self
        assert 0 <= self.num_used_cpu_blocks <= self.num_cpu_blocks, self
        self.peak_gpu_blocks = max(self.peak_gpu_blocks, self.num_used_gpu_blocks)

    def allocate(self, seq_id, num_tokens, *prefix):
        super().allocate(seq_id, num_tokens, *prefix)
        self.check()

    def append(self, seq_id, new_tokens=1):
        super().append(seq_id, new_tokens)
        self.check()

    def free(self, seq_id):
        blocks = super().free(seq_id)
        self.check()
        return blocks

    def swap_out(self, seq_id):
        self.swaps_out += 1
        blocks = super().swap_out(seq_id)
        self.check()
        return blocks

    def swap_in(self, seq_id):
        blocks = super().swap_in(seq_id)
        self.check()
        return blocks


@pytest.fixture
def kv_managers(monkeypatch) -> list[CheckedBlockManager]:
    """Every replica's block manager of the next run, checked on each change."""
    managers = []

    def make(*args, **kwargs):
        managers.append(CheckedBlockManager(*args, **kwargs))
        return managers[-1]

    monkeypatch.setattr(simulate, "BlockManager", make)
    return managers


# -- 1. an idle replica: latencies are the bare step times ---------------------------------------


def test_far_below_capacity_latencies_are_bare_step_times():
    # one request every 20 s on average: each finds the replica idle
    workload = fixed(20, 512, 16, arrival={"kind": "poisson", "rate_per_s": 0.05})
    report = simulate_serving(MODEL, "1xa100-80gb", "vllm-tp1", workload)
    it = IterationModel(load_model(MODEL), load_cluster("1xa100-80gb"), Parallel())
    assert report.num_requests == 20
    assert report.ttft_s["p50"] == pytest.approx(it.prefill_s(512), rel=0.03)
    lone_decode_s = it.step_s([Work(1, 512 + 8, True)])  # one sequence, mid-way through its output
    assert report.tpot_s["p50"] == pytest.approx(lone_decode_s, rel=0.03)


def test_engine_overhead_replaces_the_devices_and_grows_with_the_batch():
    model, cluster = load_model(MODEL), load_cluster("1xa100-80gb")
    device_default = IterationModel(model, cluster, Parallel())
    engine = DeploymentSpec.parse({"engine": {"step_overhead_us": 5000, "per_sequence_overhead_us": 20}}).engine
    heavy = IterationModel(model, cluster, Parallel(), engine)
    one, many = [Work(1, 512, True)], [Work(1, 512, True)] * 64
    step_us = cluster.device.efficiency.step_overhead_us
    assert heavy.step_s(one) - device_default.step_s(one) == pytest.approx((5000 + 20 - step_us) * 1e-6)
    assert heavy.step_s(many) - device_default.step_s(many) == pytest.approx((5000 + 64 * 20 - step_us) * 1e-6)
    named = DeploymentSpec.parse({"engine": "vllm-pre-0.6"}).engine
    assert named.step_overhead_us == 5000 and "6854" in named.source  # cited, not fitted


# -- 2. KV blocks are never over-allocated, whatever the preemption ------------------------------


@pytest.mark.parametrize("preemption", ["recompute", "swap"])
def test_memory_tight_run_preempts_within_the_pool_and_finishes(serve, kv_managers, preemption):
    # 20% of an A100 leaves KV for about 5,000 tokens: 48 sequences of up to 512 need ~24,000
    deployment = {"gpu_memory_utilization": 0.2, "preemption": preemption, "cpu_kv_buffer_GB": 4}
    workload = fixed(48, 256, 256)
    report, seqs = serve(MODEL, "1xa100-80gb", deployment, workload)
    (kv,) = kv_managers
    assert report.preemptions > 0
    assert kv.peak_gpu_blocks == kv.num_gpu_blocks  # the pool did fill up (the case is tight)
    assert 0 < report.kv_utilization["max"] <= 1.0
    assert kv.swaps_out == (report.preemptions if preemption == "swap" else 0)
    assert report.num_requests == 48
    assert all(s.finish_s is not None and s.generated == s.req.output_tokens for s in seqs)
    assert report.output_tokens_per_s * report.makespan_s == pytest.approx(48 * 256)
    assert len(kv) == 0 and kv.num_used_gpu_blocks == kv.num_used_cpu_blocks == 0  # all released


# -- 3. preemption frees blocks, step by step ----------------------------------------------------


def two_requests_in_five_blocks(preemption: str, cpu_blocks: int = 0):
    """Two 8-token prompts with 8 tokens to generate, KV blocks of 4 tokens, room for 5 blocks."""
    kv = BlockManager(num_gpu_blocks=5, block_size=4, num_cpu_blocks=cpu_blocks, watermark=0.0)
    buffer_gb = 1.0 if preemption == "swap" else 0.0  # swap needs CPU space; kv's CPU pool sets it here
    sched = StaticScheduler(DeploymentSpec(preemption=preemption, block_size=4, cpu_kv_buffer_GB=buffer_gb), kv)
    a, b = (Seq(Request(i, 0.0, 8, 8)) for i in range(2))
    sched.add(a)
    sched.add(b)
    prefill = sched.plan()
    assert prefill.kind == "prefill" and prefill.seqs == [a, b]
    assert kv.num_free_gpu_blocks == 1  # 2 blocks each
    sched.commit(prefill, 1.0)  # each makes its first token
    return sched, kv, a, b


def run_to_end(sched: StaticScheduler, now: float = 1.0) -> tuple[list[Seq], list]:
    finished, steps = [], []
    while not sched.idle:
        step = sched.plan()
        assert step is not None
        now += 1.0
        finished += sched.commit(step, now)
        steps.append(step)
    return finished, steps


def test_recompute_preemption_returns_the_victims_blocks():
    sched, kv, a, b = two_requests_in_five_blocks("recompute")
    step = sched.plan()  # each needs a third block for its next token; one is free
    assert step.kind == "decode" and step.seqs == [a]
    assert sched.preemptions == 1 and b.preemptions == 1
    assert b.id not in kv and list(sched.waiting) == [b]
    assert kv.num_free_gpu_blocks == 2  # b's two blocks came back; a took one
    assert b.prefilled == 0 and b.prompt_len == 9  # recomputes its prompt and its first token
    finished, _ = run_to_end(sched)
    assert finished == [a, b] and b.generated == 8
    assert kv.num_free_gpu_blocks == 5


def test_swap_preemption_moves_the_victims_blocks_to_cpu():
    sched, kv, a, b = two_requests_in_five_blocks("swap", cpu_blocks=4)
    step = sched.plan()
    assert step.seqs == [a] and sched.preemptions == 1
    assert kv.on_cpu(b.id) and kv.blocks(b.id) == 2 and kv.num_used_cpu_blocks == 2
    assert kv.num_free_gpu_blocks == 2 and list(sched.swapped) == [b]
    assert sched.take_swapped_tokens() == 8  # what crosses PCIe
    finished, steps = run_to_end(sched)
    assert finished == [a, b] and b.generated == 8
    assert all(s.kind == "decode" for s in steps)  # b resumed from its swapped KV, no recompute
    assert kv.num_free_gpu_blocks == 5 and kv.num_used_cpu_blocks == 0


def test_swap_without_cpu_room_falls_back_to_recompute():
    sched, kv, a, b = two_requests_in_five_blocks("swap", cpu_blocks=1)
    sched.plan()
    assert b.id not in kv and list(sched.waiting) == [b] and not sched.swapped


# -- 4. Sarathi: a token budget per step, decodes not stalled by prefills ---------------------------


def mixed_workload(seed: int) -> dict:
    """Long prompts, short outputs, about half an A100's prefill capacity for llama-2-7b."""
    return {"num_requests": 100, "seed": seed, "arrival": {"kind": "poisson", "rate_per_s": 3.0},
            "input_tokens": {"distribution": "uniform", "min": 1024, "max": 4096},
            "output_tokens": {"distribution": "uniform", "min": 16, "max": 64}}


def test_sarathi_steps_stay_within_the_chunk_budget(tmp_path):
    trace = tmp_path / "sarathi.json"
    sarathi = {"scheduler": "sarathi", "chunk_size": 512}
    report = simulate_serving(MODEL, "1xa100-80gb", sarathi, mixed_workload(0), trace_path=trace)
    steps = [e for e in trace_boxes(trace) if e["cat"] == "compute"]
    assert report.num_requests == 100 and report.steps.get("mixed", 0) > 0
    assert len(steps) == sum(report.steps.values())
    assert max(e["args"]["tokens"] for e in steps) <= 512


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sarathi_tail_tpot_is_lower_than_prefill_priority(seed):
    # vllm stops every decode for each whole prompt; sarathi adds prompt chunks to decode steps
    vllm = simulate_serving(MODEL, "1xa100-80gb", "vllm-tp1", mixed_workload(seed))
    sarathi = simulate_serving(MODEL, "1xa100-80gb", {"scheduler": "sarathi", "chunk_size": 512},
                               mixed_workload(seed))
    assert sarathi.tpot_s["p99"] < 0.8 * vllm.tpot_s["p99"]  # measured 0.32-0.63 over 12 seeds
    assert sarathi.ttft_s["p50"] > vllm.ttft_s["p50"]  # the price: prompts take several steps


# -- 5. Seesaw: as few transitions as the CPU buffer allows --------------------------------------


def seesaw(buffer_GB: float) -> dict:
    return {"prefill": {"pp": 2}, "decode": {"tp": 2}, "scheduler": "seesaw", "cpu_kv_buffer_GB": buffer_GB}


def kv_bytes_per_token() -> int:
    m = load_model(MODEL)
    return 4 * m.head_dim * m.num_kv_heads * m.num_layers  # K and V, 16-bit, every layer


def prompt_kv_bytes(workload: dict) -> int:
    return workload["num_requests"] * workload["input_tokens"]["value"] * kv_bytes_per_token()


def test_seesaw_buffer_holding_every_prompt_transitions_once():
    workload = fixed(30, 1024, 32)
    assert prompt_kv_bytes(workload) < 20 * GB
    report = simulate_serving(MODEL, "2xa100-80gb", seesaw(20), workload)
    assert report.transitions == 1  # prefill everything, then decode everything
    assert report.transition_time_s > 0 and report.num_requests == 30


def test_seesaw_small_buffer_cycles_once_per_buffer_fill(tmp_path):
    workload = fixed(30, 1024, 32)
    buffer_GB = 5.6  # about a third of the prompts' 16.1 GB of KV
    cycles = math.ceil(prompt_kv_bytes(workload) / (buffer_GB * GB))
    assert cycles == 3
    trace = tmp_path / "seesaw.json"
    report = simulate_serving(MODEL, "2xa100-80gb", seesaw(buffer_GB), workload, trace_path=trace)
    names = [e["name"] for e in trace_boxes(trace) if e["cat"] == "compute"]
    assert names.count("to decode") == cycles
    assert report.transitions == 2 * cycles - 1  # ... and back to prefill between cycles
    assert report.transition_time_s > 0 and report.num_requests == 30
    # each prefill phase stops when the buffer is full: never more prompt KV than it holds
    buffer_tokens = buffer_GB * GB / kv_bytes_per_token()
    phase_tokens, phases = 0, []
    for e in trace_boxes(trace):
        if e["name"] == "prefill":
            phase_tokens += e["args"]["tokens"]
        elif e["name"] == "to decode":
            phases.append(phase_tokens)
            phase_tokens = 0
    assert sum(phases) == 30 * 1024 and max(phases) <= buffer_tokens


def test_seesaw_decodes_a_sequence_above_the_kv_watermark():
    # decode admits sequences while KV use stays under 95% of the pool, but an idle GPU must
    # take a sequence that fits the pool even above that mark
    deployment = {**seesaw(40), "gpu_memory_utilization": 0.2}
    model, cluster, dep = load_model(MODEL), load_cluster("2xa100-80gb"), DeploymentSpec.parse(deployment)
    caps = {phase: simulate.kv_capacity_tokens(model, cluster, dep, IterationModel(model, cluster, layout), phase)
            for phase, layout in (("prefill", dep.prefill), ("decode", dep.decode))}
    longest = min(caps.values())
    assert longest > KV_WATERMARK * caps["decode"]
    report = simulate_serving(model, cluster, dep, fixed(2, longest - 16, 16))
    assert report.num_requests == 2


# -- 6. pipeline vs tensor parallel step costs ------------------------------------------------------


def step_s(cluster: str, works: list[Work], tp: int = 1, pp: int = 1) -> float:
    return IterationModel(load_model(MODEL), load_cluster(cluster), Parallel(tp=tp, pp=pp)).step_s(works)


def test_pipeline_decode_reads_the_weights_once_per_micro_batch():
    decode = [Work(1, 512, True)] * 64
    # pp=4: each stage reads its weights for each of 4 micro-batches; tp=4: a quarter, once
    assert step_s("4xa100-80gb", decode, pp=4) > step_s("4xa100-80gb", decode, tp=4)


def test_lone_prompt_crosses_every_stage_pipelining_does_not_cut_its_latency():
    prompt = [Work(4096, 0, True)]
    pp4, tp1 = step_s("4xl4", prompt, pp=4), step_s("4xl4", prompt)
    assert pp4 == pytest.approx(tp1, rel=0.02)  # the same layers, one stage after another
    assert step_s("4xl4", prompt, tp=4) < pp4  # TP splits each layer, all-reduces over PCIe included


def test_pipeline_prefills_a_batch_of_prompts_faster_over_pcie():
    prompts = [Work(4096, 0, True)] * 4
    pp4, tp4 = step_s("4xl4", prompts, pp=4), step_s("4xl4", prompts, tp=4)
    # pp=4 keeps every stage busy with one prompt each and needs no all-reduce (0.74 vs 1.93 s)
    assert pp4 < 0.5 * tp4
    assert pp4 == pytest.approx(step_s("4xl4", prompts[:1], pp=4), rel=0.02)  # the pipeline fills


def test_an_engine_whose_steps_do_not_overlap_fills_the_pipeline_every_step():
    """pipeline_overlap false (simtune's own engine): two equal micro-batches on two stages take
    three stage-times, the GPipe bubble, instead of two; a lone micro-batch's trip is unchanged;
    the final rows travel back to the first stage, where the engine samples; the fast-forward
    path (`decode_step_s`) gives the same bits."""
    from simulator.costs import comm

    model, cluster = load_model(MODEL), load_cluster("2xa100-80gb")
    engine = EngineSpec(step_overhead_us=0.0)
    overlapped = IterationModel(model, cluster, Parallel(pp=2), engine)
    synchronous = IterationModel(model, cluster, Parallel(pp=2), engine.model_copy(update={"pipeline_overlap": False}))
    stage_s, _ = overlapped._micro_batch_stage_s(BatchSums.of([Work(1, 100, True)]))
    two, one = [Work(1, 100, True)] * 2, [Work(1, 100, True)]

    def back(rows):
        return comm.p2p_s(2.0 * rows * model.hidden_size, synchronous.pp_link)

    assert synchronous.step_s(two) - overlapped.step_s(two) == pytest.approx(stage_s + back(2), rel=1e-9)
    assert synchronous.step_s(one) - overlapped.step_s(one) == pytest.approx(back(1), rel=1e-9)
    assert back(1) > 0
    # each micro-batch after the first is dispatched by itself: a stage's share of the host time
    busy_host = IterationModel(model, cluster, Parallel(pp=2), EngineSpec(step_overhead_us=4000.0,
                                                                          pipeline_overlap=False))
    assert busy_host.step_s(two) - synchronous.step_s(two) == pytest.approx(4e-3 + 4e-3 / 2, rel=1e-9)
    assert busy_host.step_s(one) - synchronous.step_s(one) == pytest.approx(4e-3, rel=1e-9)
    assert busy_host.decode_step_s([(1, 100), (1, 100)]) == busy_host.step_s(two)
    assert synchronous.decode_step_s([(1, 100), (1, 100)]) == synchronous.step_s(two)


def test_an_uneven_tensor_split_costs_its_largest_shard():
    """SmolLM2-135M (3 K/V heads, MLP 1536) on tp 2: the device with 2 of 3 GQA groups holds
    attention as at tp 1.5, each holds half the MLP; the step sits between tp 1 and tp 3."""
    model, cluster = load_model("smollm2-135m"), load_cluster("2xa100-80gb")
    its = {t: IterationModel(model, cluster, Parallel(tp=t)) for t in (1, 2, 3)}
    assert (its[2].t_attn, its[2].t_mlp) == (1.5, 2) and (its[3].t_attn, its[3].t_mlp) == (3, 3)
    h, kv_width, f = model.hidden_size, model.hidden_size * 3 // 9, model.ffn_hidden_size
    attention, mlp = 2 * (h * (h + 2 * kv_width) + h * h), 2 * 3 * h * f   # 16-bit bytes
    assert its[2].weight_bytes == pytest.approx(attention * 2 / 3 + mlp / 2)
    assert its[2].kv_bytes_per_token == pytest.approx(its[1].kv_bytes_per_token * 2 / 3)
    assert its[2].flops_per_token == pytest.approx(its[2].weight_bytes)   # 2 FLOPs per 16-bit weight
    assert its[3].weight_bytes < its[2].weight_bytes < its[1].weight_bytes
    report = simulate_serving(model, "2xa100-80gb", DeploymentSpec(prefill=Parallel(tp=2)), fixed(4, 64, 8))
    assert report.output_tokens_per_s > 0


# -- 7. deployments that cannot run --------------------------------------------------------------

SMALL = fixed(2, 512, 16)


@pytest.mark.parametrize("model, cluster, deployment, workload, field, message", [
    (MODEL, "4xa100-80gb", {"prefill": {"tp": 64}}, SMALL,
     "deployment.prefill.tp", "must divide num_attention_heads = 32"),
    ("llama-3-15b-class", "4xa100-80gb", {"prefill": {"tp": 12}}, SMALL,
     "deployment.prefill.tp", "num_kv_heads = 8"),
    ("llama-debug", "8xa100-80gb", {"prefill": {"pp": 8}}, SMALL,
     "deployment.prefill.pp", "must be <= num_layers = 4"),
    (MODEL, "1xa100-80gb", {"gpu_memory_utilization": 0.2}, fixed(2, 4096, 4096),
     "deployment.prefill", "memory too small for one sequence"),
    ("llama-2-70b", "1xa100-80gb", {}, SMALL,
     "deployment.prefill", "weights (128.5 GiB per device)"),
    (MODEL, "4xa100-80gb", {"dp": 2}, SMALL,
     "deployment", "must use the 4 devices of 4xa100-80gb"),
    (MODEL, "1xa100-80gb", {"max_batched_tokens": 2048}, fixed(2, 4096, 16),
     "deployment.max_batched_tokens", "use scheduler: sarathi"),
    (MODEL, "4xa100-80gb", {**seesaw(8), "decode": {"tp": 4}}, SMALL,
     "deployment.decode", "must use as many devices as prefill (2)"),
    (MODEL, "2xa100-80gb", {**seesaw(8), "scheduler": "vllm"}, SMALL,
     "deployment.scheduler", "need 'seesaw'"),
    (MODEL, "2xa100-80gb", seesaw(0), SMALL,
     "deployment.cpu_kv_buffer_GB", "needs a CPU KV buffer"),
    (MODEL, "2xa100-80gb", seesaw(0.1), SMALL,
     "deployment.cpu_kv_buffer_GB", "must hold the KV of the longest prompt"),
    (MODEL, "1xa100-80gb", {"engine": "vllm-0.1"}, SMALL,
     "deployment.engine", "unknown engine; catalog names are: vllm-0.2-ray, vllm-pre-0.6"),
    (MODEL, "1xa100-80gb", {"engine": {"step_overhead_us": -1}}, SMALL,
     "deployment.engine.step_overhead_us", "greater than or equal to 0"),
])
def test_bad_deployment_names_the_field(model, cluster, deployment, workload, field, message):
    with pytest.raises(SpecError, match=re.escape(message)) as err:
        simulate_serving(model, cluster, deployment, workload)
    assert err.value.field == field


def test_chunked_prefill_serves_prompts_longer_than_the_token_budget():
    sarathi = {"scheduler": "sarathi", "max_batched_tokens": 2048, "chunk_size": 512}
    assert simulate_serving(MODEL, "1xa100-80gb", sarathi, fixed(2, 4096, 16)).num_requests == 2


# -- 8. the report ------------------------------------------------------------------------------


def test_report_contract_and_data_parallel_scaling():
    workload = {"num_requests": 512, "input_tokens": {"distribution": "uniform", "min": 64, "max": 512},
                "output_tokens": {"distribution": "uniform", "min": 16, "max": 256}}
    one = simulate_serving(MODEL, "1xa100-80gb", {"dp": 1}, workload)
    two = simulate_serving(MODEL, "2xa100-80gb", {"dp": 2}, workload)  # same replica, twice
    data = one.to_dict()
    for key in ("output_tokens_per_s", "total_tokens_per_s", "requests_per_s", "makespan_s"):
        assert data[key] > 0
    for key in ("ttft_s", "tpot_s"):
        assert {"p50", "p90", "p99"} <= set(data[key])
        assert data[key]["p50"] <= data[key]["p90"] <= data[key]["p99"]
    assert data["total_tokens_per_s"] > data["output_tokens_per_s"]
    json.dumps(data)  # plain data
    assert 1.7 <= two.output_tokens_per_s / one.output_tokens_per_s <= 2.1


# -- 9. the Chrome trace ------------------------------------------------------------------------


def test_trace_has_a_process_per_replica(tmp_path):
    trace = tmp_path / "dp2.json"
    simulate_serving(MODEL, "2xa100-80gb", {"dp": 2}, fixed(8, 256, 8), trace_path=trace)
    meta = json.loads(trace.read_text())["traceEvents"]
    names = {e["args"]["name"] for e in meta if e["name"] == "process_name"}
    assert names == {"replica 0", "replica 1"}
    assert {e["pid"] for e in trace_boxes(trace) if e["cat"] == "compute"} == {0, 1}


def test_seesaw_trace_shows_transitions_and_kv_copies(tmp_path):
    trace = tmp_path / "seesaw.json"
    simulate_serving(MODEL, "2xa100-80gb", seesaw(5.6), fixed(30, 1024, 32), trace_path=trace)
    boxes = trace_boxes(trace)
    compute = {e["name"] for e in boxes if e["cat"] == "compute"}
    copies = {e["name"] for e in boxes if e["cat"] == "kv"}
    assert {"prefill", "decode", "to decode", "to prefill"} <= compute
    assert copies == {"kv to cpu", "kv to gpu"}


def test_swap_preemption_without_cpu_space_is_an_error():
    with pytest.raises(SpecError, match=r"deployment.cpu_kv_buffer_GB = 0.0: swap preemption needs CPU swap space"):
        DeploymentSpec.parse({"preemption": "swap"})


def _with_efficiency(cluster, **fields):
    dev = cluster.device
    eff = dev.efficiency.model_copy(update=fields)
    return cluster.model_copy(update={"device": dev.model_copy(update={"efficiency": eff})})


def test_a_measured_attention_curve_prices_prompts_at_their_length_and_verifications_too():
    """A flat curve at the device's own efficiency and no diagonal changes nothing; a curve that
    halves the efficiency at a prompt's length adds exactly that prompt's attention once more,
    and prices a speculative verification (decode_step_s, the fast-forward path) at its k + 1
    tokens with the same bits as step_s."""
    model = load_model("smollm2-135m")
    base = _with_efficiency(load_cluster("1xa100-80gb"), attention_half_seq=0.0)
    e = base.device.efficiency.attention
    flat = _with_efficiency(base, attention_curve=[(100.0, e)])
    steep = _with_efficiency(base, attention_curve=[(100.0, e), (1000.0, e / 2)])
    its = {name: IterationModel(model, c, Parallel(), EngineSpec(step_overhead_us=0.0))
           for name, c in (("base", base), ("flat", flat), ("steep", steep))}
    prompt = [Work(1000, 0, True)]
    assert its["flat"].step_s(prompt) == its["base"].step_s(prompt)
    pairs = 1000 * 1001 // 2
    attention = (2 * 4 * model.hidden_size * pairs * model.num_layers) / (e * base.device.peak_flops)
    assert its["steep"].step_s(prompt) - its["base"].step_s(prompt) == pytest.approx(attention, rel=1e-9)
    verify = [Work(5, 300, 5)] * 3
    assert its["steep"].decode_step_s([(3, 900)], new_tokens=5) == its["steep"].step_s(verify)
    assert its["steep"].step_s(verify) < its["steep"].step_s(prompt)


def test_the_curve_holds_within_a_kernel_blocking_and_steps_between_them():
    from simulator.costs.timing import curve_efficiency
    curve, steps = [(96, 0.1), (160, 0.2), (256, 0.3), (704, 0.5), (1024, 0.7), (2048, 0.9)], [192, 768]
    assert curve_efficiency(curve, steps, 767) == 0.5 and curve_efficiency(curve, steps, 768) == 0.7
    assert curve_efficiency(curve, steps, 191) == 0.2 and curve_efficiency(curve, steps, 192) == 0.3
    assert curve_efficiency(curve, steps, 50) == 0.1 and curve_efficiency(curve, steps, 4096) == 0.9
    assert curve_efficiency(curve, steps, (96 * 160) ** 0.5) == pytest.approx(0.15)   # halfway in log length
    arr = curve_efficiency(curve, steps, [50, 767, 768])
    assert list(arr) == [0.1, 0.5, 0.7]
    # a blocking without measured points of its own is read across its neighbours' points
    assert curve_efficiency([(96, 0.1), (1024, 0.7)], steps, 400) == pytest.approx(
        0.1 + 0.6 * math.log(400 / 96) / math.log(1024 / 96))


def test_an_eager_engine_pays_the_unfused_passes_at_the_simple_op_bandwidth():
    model, cluster = load_model("smollm2-135m"), load_cluster("1xcpu")
    fused = IterationModel(model, cluster, Parallel(), EngineSpec(step_overhead_us=0.0))
    eager = IterationModel(model, cluster, Parallel(), EngineSpec(step_overhead_us=0.0, eager=True))
    faster = IterationModel(model, _with_efficiency(cluster, memory_bound_simple=1.0), Parallel(),
                            EngineSpec(step_overhead_us=0.0, eager=True))
    prompt = [Work(512, 0, True)]
    assert fused.step_s(prompt) < faster.step_s(prompt) < eager.step_s(prompt)
    assert eager.decode_step_s([(4, 400)]) == eager.step_s([Work(1, 100, True)] * 4)
