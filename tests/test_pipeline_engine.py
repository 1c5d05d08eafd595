"""Pipeline engine as timelines: op orders, start times, bubbles, overlap, memory, traces."""

from __future__ import annotations

import json
import os

import pytest

from simulator.engine.pipeline import simulate_pipeline
from simulator.engine.pipeline_api import ChunkCost, OpCost, PipelineConfig, StageCost
from simulator.engine.schedules import Op, stage_ops
from simulator.engine.trace import chrome_trace_dict, write_chrome_trace


def stage(f=1.0, b=2.0, v=1, act_bytes=1.0, grad_sync_s=0.0, layers=1, optimizer_s=0.0,
          param_sync_s=0.0) -> StageCost:
    """A stage whose full cost (forward f, backward b, activations) is split over v chunks."""
    chunk = ChunkCost(OpCost({"compute": f / v}), OpCost({"compute": b / v}), layers,
                      grad_sync_s / v, act_bytes / v)
    return StageCost([chunk] * v, optimizer_s, param_sync_s)


def run(schedule, p, m, v=1, p2p_s=0.0, overlap=True, record_events=True, **stage_kw):
    config = PipelineConfig(schedule, p, m, v, p2p_s, overlap)
    return simulate_pipeline([stage(v=v, **stage_kw) for _ in range(p)], config, record_events)


def starts(result, stream="compute") -> dict[tuple[int, str], float]:
    return {(e.stage, e.name): e.start_s for e in result.events if e.stream == stream}


def boxes(result, stage, stream) -> list[tuple[str, float, float]]:
    return [(e.name, e.start_s, e.end_s) for e in result.events
            if e.stage == stage and e.stream == stream]


# --- schedules ------------------------------------------------------------------------------

def test_1f1b_order_warms_up_then_alternates():
    F, B = (lambda j: Op("F", 0, j)), (lambda j: Op("B", 0, j))
    assert stage_ops("1f1b", 0, 3, 4) == [F(0), F(1), F(2), B(0), F(3), B(1), B(2), B(3)]
    assert stage_ops("1f1b", 2, 3, 4) == [F(0), B(0), F(1), B(1), F(2), B(2), F(3), B(3)]
    assert stage_ops("gpipe", 1, 3, 2) == [F(0), F(1), B(0), B(1)]


def test_interleaved_order_matches_megatron():
    # p=2, m=4, v=2, stage 0: warm-up (2-0-1)*2 + (2-1)*2 = 4 forwards.
    got = [f"{k}{j}.c{c}" for k, c, j in stage_ops("interleaved", 0, 2, 4, 2)]
    assert got == ["F0.c0", "F1.c0", "F0.c1", "F1.c1",
                   "F2.c0", "B0.c1", "F3.c0", "B1.c1", "F2.c1", "B0.c0", "F3.c1", "B1.c0",
                   "B2.c1", "B3.c1", "B2.c0", "B3.c0"]


@pytest.mark.parametrize("schedule,p,m,v", [
    ("gpipe", 3, 5, 1), ("1f1b", 4, 3, 1), ("1f1b", 1, 4, 1), ("interleaved", 4, 8, 3),
    ("interleaved", 4, 4, 2), ("interleaved", 1, 3, 2), ("interleaved", 3, 9, 2)])
def test_every_schedule_runs_each_op_once_and_completes(schedule, p, m, v):
    for s in range(p):
        ops = stage_ops(schedule, s, p, m, v)
        assert sorted(ops) == sorted(Op(k, c, j) for k in "FB" for c in range(v) for j in range(m))
    # Uneven costs and p2p delays must not deadlock or reorder anything.
    result = run(schedule, p, m, v, p2p_s=0.3, f=1.3, b=2.9)
    assert result.iteration_time_s >= m * (1.3 + 2.9) - 1e-9


def test_interleaved_needs_m_multiple_of_p():
    with pytest.raises(ValueError, match="num_microbatches"):
        run("interleaved", 4, 6, 2)


# --- timelines ------------------------------------------------------------------------------

def test_1f1b_two_stages_two_microbatches_timeline():
    r = run("1f1b", p=2, m=2, f=1.0, b=2.0)
    assert starts(r) == {
        (0, "F0.c0"): 0, (0, "F1.c0"): 1, (0, "B0.c0"): 4, (0, "B1.c0"): 7,
        (1, "F0.c0"): 1, (1, "B0.c0"): 2, (1, "F1.c0"): 4, (1, "B1.c0"): 5,
    }
    assert r.iteration_time_s == 9.0
    assert [t.compute_end_s for t in r.stages] == [9.0, 7.0]


def test_p2p_delays_every_cross_stage_dependency():
    r = run("1f1b", p=2, m=2, f=1.0, b=2.0, p2p_s=0.5)
    assert starts(r) == {
        (0, "F0.c0"): 0, (0, "F1.c0"): 1, (0, "B0.c0"): 5, (0, "B1.c0"): 8,
        (1, "F0.c0"): 1.5, (1, "B0.c0"): 2.5, (1, "F1.c0"): 4.5, (1, "B1.c0"): 5.5,
    }
    assert boxes(r, 0, "p2p") == [("act F0.c0", 1, 1.5), ("act F1.c0", 2, 2.5)]
    assert boxes(r, 1, "p2p") == [("grad B0.c0", 4.5, 5), ("grad B1.c0", 7.5, 8)]
    assert r.iteration_time_s == 10.0


def test_p2p_stream_sends_one_at_a_time():
    # Sends (3 s) outlast forwards (1 s): the second activation queues behind the first.
    r = run("gpipe", p=2, m=2, f=1.0, b=2.0, p2p_s=3.0)
    assert boxes(r, 0, "p2p")[:2] == [("act F0.c0", 1, 4), ("act F1.c0", 4, 7)]
    assert starts(r)[1, "F0.c0"] == 4 and starts(r)[1, "F1.c0"] == 7


def test_single_stage_sends_are_free():
    r = run("interleaved", p=1, m=2, v=2, f=2.0, b=4.0, p2p_s=10.0)
    assert r.iteration_time_s == pytest.approx(2 * 6.0)
    assert boxes(r, 0, "p2p") == []


# --- bubbles --------------------------------------------------------------------------------

@pytest.mark.parametrize("schedule", ["1f1b", "gpipe"])
@pytest.mark.parametrize("p,m", [(2, 1), (2, 4), (4, 4), (4, 8), (8, 32)])
def test_bubble_fraction_is_p_minus_1_over_m_plus_p_minus_1(schedule, p, m):
    r = run(schedule, p, m, f=1.0, b=2.0, record_events=False)
    for t in r.stages:
        idle = r.iteration_time_s - sum(t.busy_parts.values())
        assert idle / r.iteration_time_s == pytest.approx((p - 1) / (m + p - 1))


@pytest.mark.parametrize("p,m,v", [(2, 4, 2), (4, 8, 2), (4, 8, 4), (4, 16, 3), (8, 16, 3)])
def test_interleaved_bubble_shrinks_by_v(p, m, v):
    ideal = m * (1.0 + 2.0)
    r = run("interleaved", p, m, v, f=1.0, b=2.0, record_events=False)
    assert r.iteration_time_s == pytest.approx(ideal * (1 + (p - 1) / (v * m)))


# --- data-parallel gradient sync ------------------------------------------------------------

def test_grad_buckets_overlap_the_last_backward():
    # One stage, F0 [0,1] B0 [1,3] F1 [3,4] B1 [4,6]. Two 1.5 s buckets become ready at
    # 5 and 6 during B1 (the chunk's last backward); the optimizer (0.5 s) waits for both.
    kw = dict(f=1.0, b=2.0, grad_sync_s=3.0, layers=2, optimizer_s=0.5)
    r = run("1f1b", p=1, m=2, **kw)
    assert boxes(r, 0, "dp") == [("grad_sync.c0.b0", 5, 6.5), ("grad_sync.c0.b1", 6.5, 8)]
    assert r.stages[0].dp_exposed_s == 2.0
    assert boxes(r, 0, "compute")[-1] == ("optimizer", 8, 8.5)
    assert r.iteration_time_s == 8.5

    r = run("1f1b", p=1, m=2, overlap=False, **kw)
    assert boxes(r, 0, "dp") == [("grad_sync.c0", 6, 9)]
    assert r.stages[0].dp_exposed_s == 3.0
    assert r.iteration_time_s == 9.5


def test_overlap_hides_grad_sync_of_early_finishing_stages():
    kw = dict(f=1.0, b=2.0, grad_sync_s=1.0, layers=4, param_sync_s=0.25)
    on, off = run("1f1b", 4, 8, **kw), run("1f1b", 4, 8, overlap=False, **kw)
    for s in range(4):
        assert on.stages[s].dp_exposed_s < off.stages[s].dp_exposed_s == 1.0
        assert boxes(on, s, "dp")[-1][0] == "param_sync"
    assert on.iteration_time_s < off.iteration_time_s


# --- activation memory ----------------------------------------------------------------------

@pytest.mark.parametrize("p,m", [(4, 8), (4, 2), (8, 8)])
def test_inflight_microbatches(p, m):
    one_f = run("1f1b", p, m, record_events=False)
    assert [t.peak_inflight_microbatches for t in one_f.stages] == [min(p - s, m) for s in range(p)]
    gpipe = run("gpipe", p, m, record_events=False)
    assert [t.peak_inflight_microbatches for t in gpipe.stages] == [m] * p


@pytest.mark.parametrize("p,v", [(4, 2), (4, 4), (8, 3)])
def test_interleaved_stage0_holds_1_plus_p_minus_1_over_pv_more(p, v):
    # Korthikanti et al. (MLSys'23), Sec. 4.2.3: interleaving multiplies the first stage's
    # activation memory by 1 + (p-1)/(p*v).
    m = 2 * p
    base = run("1f1b", p, m, act_bytes=1.0, record_events=False).stages[0].peak_inflight_bytes
    inter = run("interleaved", p, m, v, act_bytes=1.0, record_events=False).stages[0]
    assert inter.peak_inflight_bytes == pytest.approx(base * (1 + (p - 1) / (p * v)))


# --- trace ----------------------------------------------------------------------------------

def test_chrome_trace_round_trips(tmp_path):
    r = run("1f1b", p=2, m=2, p2p_s=0.5, grad_sync_s=1.0, optimizer_s=0.5)
    path = write_chrome_trace(r.events, tmp_path / "iter.json")
    trace = json.loads(path.read_text())
    assert trace == json.loads(json.dumps(chrome_trace_dict(r.events)))
    xs = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    assert len(xs) == len(r.events) == 8 + 4 + 2 + 2  # compute, p2p, dp, optimizer
    first = next(e for e in xs if e["pid"] == 1 and e["name"] == "F0.c0")
    assert (first["ts"], first["dur"], first["tid"]) == (1.5e6, 1e6, 0)
    names = {(e["pid"], e.get("tid"), e["args"]["name"]) for e in trace["traceEvents"]
             if e["ph"] == "M" and e["name"] in ("process_name", "thread_name")}
    assert (1, None, "stage 1") in names and (0, 2, "dp") in names
    assert os.listdir(tmp_path) == ["iter.json"]  # no temp file left behind


def test_no_events_when_not_recording():
    assert run("interleaved", 4, 8, 2, record_events=False).events == []
