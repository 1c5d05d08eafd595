"""Benchmark the training simulator: one large iteration, and the compiled cost model on a grid.

(a) Wall time of `simulate_training` for GPT-3 175B on 1024 A100-80GB (Megatron-style
    interleaved 1F1B, p=16, v=3, m=192: 2*p*v*m = 18,432 forward/backward ops), median of
    5 runs, and the engine alone on the same stages. Baseline measured in the same run: the
    catalog 'debug' plan (gpt-debug on 2xa100-80gb, 16 ops).
(b) Plans per second of `compiled_costs()` over a grid of 1,105,920 plans, one call for the
    whole grid (as a broadcast grid, and as flat dense arrays of the same points); baseline
    in the same run: the same sympy expressions evaluated point by point with .subs/.evalf
    on a sample of grid points, extrapolated per point (values are checked to agree).

Usage: python benchmarks/bench_training_sim.py [--quick] [--out PATH]
Writes JSON (default benchmarks/results/training_sim.json) atomically.
"""

from __future__ import annotations

import statistics
import time

import common
import numpy as np
from common import timed

from simulator.costs.compile import CompiledCosts, compiled_costs
from simulator.costs.symbols import ALL_SYMBOLS, GRAD_BYTES, model_values
from simulator.costs.transformer import EXPRESSIONS
from simulator.engine.pipeline import simulate_pipeline
from simulator.engine.pipeline_api import PipelineConfig
from simulator.specs.catalog import load_cluster, load_model, load_plan
from simulator.training import simulate_training
from simulator.training.costs import TrainingCostModel

DEFAULT_OUT = common.RESULTS / "training_sim.json"

LARGE = {
    "model": "gpt3-175b",
    "cluster": "128x8xa100-80gb",
    "plan": {
        "name": "gpt3-175b-1024gpu", "tp": 8, "pp": 16, "dp": 8, "micro_batch_size": 1,
        "global_batch_size": 1536, "schedule": "interleaved", "virtual_stages": 3,
        "sequence_parallel": True, "recompute": "selective", "zero_stage": 1,
        "gradient_dtype": "fp32", "flash_attention": False,
    },
}
SMALL = {"model": "gpt-debug", "cluster": "2xa100-80gb", "plan": "debug"}

# Repetitions: full run, and --quick.
REPS = {
    "large": (5, 2),
    "small": (25, 5),
    "grid": (7, 2),
    "sympy_points": (200, 40),
}


def num_ops(plan) -> int:
    """Forward and backward ops of one iteration: 2 * p * v * m."""
    return 2 * plan.pp * plan.virtual_stages * plan.num_microbatches


# --- (a) simulate_training --------------------------------------------------------------------

def bench_simulation(case: dict, reps: int) -> dict:
    model, cluster, plan = load_model(case["model"]), load_cluster(case["cluster"]), load_plan(case["plan"])
    report = simulate_training(model, cluster, plan)  # warm-up: compiles the cost model once
    times, _ = timed(lambda: simulate_training(model, cluster, plan), reps)
    median = statistics.median(times)
    ops = num_ops(plan)
    return {
        "model": model.name, "cluster": cluster.name, "devices": cluster.num_devices,
        "p": plan.pp, "v": plan.virtual_stages, "m": plan.num_microbatches, "ops": ops,
        "wall_s_median": median, "wall_s_all": times, "ops_per_s": ops / median,
        "predicted_iteration_time_s": report.iteration_time_s, "predicted_mfu": report.mfu,
    }


def bench_engine_only(case: dict, reps: int) -> dict:
    """One `simulate_pipeline` run on prebuilt stages, no trace (simulate_training runs the
    engine twice: as planned and with free p2p, to split the bubble from exposed p2p)."""
    model, cluster, plan = load_model(case["model"]), load_cluster(case["cluster"]), load_plan(case["plan"])
    costs = TrainingCostModel(model, plan, cluster)
    stages = costs.build_stages()
    config = PipelineConfig(plan.schedule, plan.pp, plan.num_microbatches, plan.virtual_stages,
                            costs.p2p_s(), plan.overlap_grad_reduce)
    times, _ = timed(lambda: simulate_pipeline(stages, config, record_events=False), reps)
    median = statistics.median(times)
    return {"ops": num_ops(plan), "wall_s_median": median, "wall_s_all": times,
            "ops_per_s": num_ops(plan) / median}


# --- (b) compiled cost model over a grid of plans -----------------------------------------------

def plan_grid(model_name: str = "gpt3-175b") -> dict[str, np.ndarray | float]:
    """Symbol values over a broadcast grid of plans (sparse meshgrid: one axis per knob).

    Axes: micro-batch 1..16, tp 1/2/4/8, dp 1/8/64, layers per stage 1..96, checkpointed
    fraction 0/0.5/1 of the stage's layers, ZeRO stage 0..3, optimizer offload 0..1 by 0.25.
    """
    b, t, d, L, ck, zero, off = np.meshgrid(
        np.arange(1, 17), [1, 2, 4, 8], [1, 8, 64], np.arange(1, 97), [0.0, 0.5, 1.0],
        np.arange(4), np.linspace(0.0, 1.0, 5), indexing="ij", sparse=True,
    )
    model = load_model(model_name)
    k = np.floor(ck * L)
    return {
        **model_values(model),
        "b": b.astype(float), "s": float(model.seq_length), "t": t.astype(float),
        "d": d.astype(float), "L_st": L.astype(float), "k": k,
        "sq": (t > 1).astype(float), "sel": (k == 0).astype(float), "flash": 0.0,
        "z1": (zero >= 1).astype(float), "z2": (zero >= 2).astype(float),
        "z3": (zero >= 3).astype(float), "gb": float(GRAD_BYTES["fp32"]),
        "o_w": 0.0, "o_g": 0.0, "o_o": off, "o_a": 0.0, "n_inflight": 8.0,
    }


def grid_point(values: dict, shape: tuple[int, ...], flat_index: int) -> dict[str, float]:
    """Scalar symbol values at one point of the broadcast grid."""
    idx = np.unravel_index(flat_index, shape)
    return {name: float(np.broadcast_to(v, shape)[idx]) for name, v in values.items()}


def sympy_evaluate(point: dict[str, float]) -> dict[str, float]:
    """The baseline: every expression by .subs then .evalf, as one would without lambdify."""
    subs = {sym: point[sym.name] for sym in ALL_SYMBOLS}  # the declared symbols (assumptions)
    return {name: float(expr.subs(subs).evalf()) for name, expr in EXPRESSIONS.items()}


def time_compile() -> float:
    """Seconds to lambdify the expression table; only meaningful as the process's first
    compile (sympy caches the simplification and CSE work for later ones)."""
    t0 = time.perf_counter()
    CompiledCosts()
    return time.perf_counter() - t0


def bench_compiled(reps: int, sympy_points: int, seed: int = 0) -> dict:
    fn = compiled_costs()
    values = plan_grid()
    shape = np.broadcast_shapes(*(np.shape(v) for v in values.values()))
    points = int(np.prod(shape))
    fn(values)  # warm-up
    times, _ = timed(lambda: fn(values), reps)
    call_s = statistics.median(times)
    out = fn(values)
    # The same points as flat, fully materialized arrays: what a tuner passes for a list of
    # legal plans, where broadcasting cannot skip work on axes an expression ignores.
    dense = {n: np.broadcast_to(v, shape).ravel() if np.ndim(v) else v for n, v in values.items()}
    fn(dense)  # warm-up (first touch of the output arrays)
    dense_times, _ = timed(lambda: fn(dense), reps)
    dense_s = statistics.median(dense_times)

    rng = np.random.default_rng(seed)
    sample = rng.choice(points, size=sympy_points, replace=False)
    t0 = time.perf_counter()
    baseline = [sympy_evaluate(grid_point(values, shape, int(i))) for i in sample]
    sympy_s = (time.perf_counter() - t0) / sympy_points

    worst = 0.0  # largest relative difference between the two evaluations
    for i, ref in zip(sample, baseline):
        idx = np.unravel_index(int(i), shape)
        for name, want in ref.items():
            got = float(out[name][idx])
            worst = max(worst, abs(got - want) / max(abs(want), 1e-300))
    assert worst < 1e-9, f"compiled and sympy evaluations disagree (max rel diff {worst:.2e})"
    return {
        "grid_points": points, "grid_shape": list(shape), "expressions": len(fn.names),
        "call_s_median": call_s, "call_s_all": times,
        "compiled_points_per_s": points / call_s,
        "dense_call_s_median": dense_s, "dense_call_s_all": dense_times,
        "dense_points_per_s": points / dense_s,
        "sympy_points_sampled": sympy_points, "sympy_s_per_point": sympy_s,
        "sympy_points_per_s": 1.0 / sympy_s,
        "speedup": (points / call_s) * sympy_s,
        "speedup_dense": (points / dense_s) * sympy_s,
        "max_rel_diff": worst,
    }


# --- output -------------------------------------------------------------------------------------

def print_table(sim: dict, comp: dict) -> None:
    large, engine, small = sim["large"], sim["engine_only"], sim["baseline_small"]
    rows = [
        ("simulate_training, GPT-3 175B / 1024 GPU", f"{large['wall_s_median'] * 1e3:9.1f} ms",
         f"{large['ops_per_s']:12,.0f} ops/s"),
        ("  engine only (1 run, no trace)", f"{engine['wall_s_median'] * 1e3:9.1f} ms",
         f"{engine['ops_per_s']:12,.0f} ops/s"),
        ("  baseline: debug plan (16 ops)", f"{small['wall_s_median'] * 1e3:9.2f} ms",
         f"{small['ops_per_s']:12,.0f} ops/s"),
        ("  ratio large / baseline", f"{sim['wall_ratio']:9.1f} x",
         f"{sim['ops_ratio']:12.0f} x ops"),
        (f"compiled_costs, {comp['grid_points']:,} plans", f"{comp['call_s_median'] * 1e3:9.1f} ms",
         f"{comp['compiled_points_per_s']:12,.0f} plans/s"),
        ("  same plans as flat dense arrays", f"{comp['dense_call_s_median'] * 1e3:9.1f} ms",
         f"{comp['dense_points_per_s']:12,.0f} plans/s"),
        (f"  baseline: sympy subs/evalf ({comp['sympy_points_sampled']} pts)",
         f"{comp['sympy_s_per_point'] * 1e3:9.1f} ms/pt", f"{comp['sympy_points_per_s']:12,.1f} plans/s"),
        ("  one-time compile (lambdify + CSE)", f"{comp['compile_s_first']:9.2f} s", ""),
        ("  speedup compiled grid / sympy", "", f"{comp['speedup']:12,.0f} x"),
        ("  speedup compiled dense / sympy", "", f"{comp['speedup_dense']:12,.0f} x"),
    ]
    width = max(len(r[0]) for r in rows)
    for name, a, b in rows:
        print(f"{name:<{width}}  {a:>14}  {b:>18}")


def main(argv: list[str] | None = None) -> dict:
    args = common.parser(__doc__.splitlines()[0], "fewer repetitions (smoke run)", DEFAULT_OUT,
                         markdown=False).parse_args(argv)
    reps = {k: v[1] if args.quick else v[0] for k, v in REPS.items()}

    compile_s = time_compile()  # first, while sympy's caches are cold
    large = bench_simulation(LARGE, reps["large"])
    engine = bench_engine_only(LARGE, reps["large"])
    small = bench_simulation(SMALL, reps["small"])
    sim = {"large": large, "engine_only": engine, "baseline_small": small,
           "wall_ratio": large["wall_s_median"] / small["wall_s_median"],
           "ops_ratio": large["ops"] / small["ops"],
           "ops_per_s_ratio": large["ops_per_s"] / small["ops_per_s"],
           "note": "simulate_training runs the engine twice (as planned, and with free p2p)"}
    comp = {"compile_s_first": compile_s, **bench_compiled(reps["grid"], reps["sympy_points"])}
    result = {
        **common.run_fields("training_sim", args.quick, reps),
        "large_plan": LARGE, "small_plan": SMALL,
        "simulate_training": sim, "compiled_costs": comp,
    }
    print_table(sim, comp)
    common.write_results(result, args.out)
    return result


if __name__ == "__main__":
    main()
