"""Inter-stage search: a MILP that picks every stage's layer count and frontier point.

Write-up (Mist, Zhu et al. EuroSys'25, Sec. 5, in our notation). Stage i chooses exactly one
candidate c from its list (a layer count l_c and a Pareto point with time T_ic and boundary
extra D_ic).

1. Variables: x_ic in {0, 1}; T_max >= 0; E >= 0.
2. Objective: minimize (m - 1/v) * T_max + (1/v) * sum_i T_i + E, where T_i = sum_c x_ic T_ic
   (for v = 1 this is (m - 1) * T_max + sum_i T_i + E, the 1F1B iteration time).
3. Constraints:
   (one)     sum_c x_ic = 1                                for every stage i
   (layers)  sum_i sum_c x_ic * l_c = L
   (max)     T_max >= T_i                                  for every stage i
   (extra)   E >= D_i - sum_{j<i} T_j                      for every stage i
Then the solution is verified: one candidate per stage, layers summing to L, and the
objective equal to the closed-form time of the chosen stages.
"""

from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass

import pulp

from simulator.errors import InfeasiblePlan
from tuner.training.analytic import pipeline_time_s


@dataclass(frozen=True)
class Candidate:
    layers: int
    T: float
    D: float
    ref: object  # (table, row) for building the plan


def solver() -> pulp.LpSolver:
    """HiGHS when installed (a dependency of simtune), else CBC (which ships with pulp)."""
    for name in ("HiGHS", "PULP_CBC_CMD"):
        if name in pulp.listSolvers(onlyAvailable=True):
            return pulp.getSolver(name, msg=False)
    raise RuntimeError("no MILP solver: install highspy, or pulp with its bundled CBC")


def solve_stages(candidates: list[list[Candidate]], num_layers: int, num_microbatches: int,
                 virtual_stages: int = 1, p2p_s: float = 0.0) -> tuple[list[Candidate], float]:
    """Choose one candidate per stage minimizing the pipeline time. Returns (choice, time)."""
    m, v, p = num_microbatches, virtual_stages, len(candidates)
    prob = pulp.LpProblem("inter_stage", pulp.LpMinimize)
    # 1. variables
    x = [[_variable(prob, f"x_{i}_{c}", cat="Binary") for c in range(len(cs))] for i, cs in enumerate(candidates)]
    t_max = _variable(prob, "T_max", lowBound=0)
    extra = _variable(prob, "E", lowBound=0)
    T = [pulp.lpSum(xc * cand.T for xc, cand in zip(x[i], candidates[i])) for i in range(p)]
    # 2. objective
    prob += (m - 1 / v) * t_max + (1 / v) * pulp.lpSum(T) + extra
    # 3. constraints
    for i in range(p):
        prob += pulp.lpSum(x[i]) == 1, f"one_{i}"
        prob += t_max >= T[i], f"max_{i}"
        D_i = pulp.lpSum(xc * cand.D for xc, cand in zip(x[i], candidates[i]))
        prob += extra >= D_i - pulp.lpSum(T[:i]), f"extra_{i}"
    prob += pulp.lpSum(xc * cand.layers for i in range(p) for xc, cand in zip(x[i], candidates[i])) == num_layers, "layers"
    with _quiet_stdout():
        status = prob.solve(solver())
    if pulp.LpStatus[status] != "Optimal":
        raise InfeasiblePlan(f"no assignment of {num_layers} layers to {p} stages fits in memory "
                             f"(solver status {pulp.LpStatus[status]})")
    choice = [cands[max(range(len(cands)), key=lambda c: x[i][c].value())] for i, cands in enumerate(candidates)]
    time_s = _verify(choice, num_layers, m, v, p2p_s, pulp.value(prob.objective))
    return choice, time_s


@contextlib.contextmanager
def _quiet_stdout():
    """Solvers print banners from native code straight to file descriptor 1; stdout belongs
    to `--json`, so point fd 1 at /dev/null while the solver runs."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 1)
            yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def _variable(prob: pulp.LpProblem, name: str, **kw) -> pulp.LpVariable:
    """PuLP >= 3.3 attaches variables to their problem; older releases construct them bare."""
    if hasattr(prob, "add_variable"):
        return prob.add_variable(name, **kw)
    return pulp.LpVariable(name, **kw)


def _verify(choice: list[Candidate], num_layers: int, m: int, v: int, p2p_s: float, objective: float) -> float:
    assert sum(c.layers for c in choice) == num_layers, "MILP broke the layer constraint"
    time_s = pipeline_time_s([c.T for c in choice], [c.D for c in choice], m, v, p2p_s)
    closed_form = time_s - 2 * (len(choice) - 1) * p2p_s
    # relative to the larger of the two terms: an absurd link (p2p_s of 1e250 s) cancels the
    # whole closed form in floating point, which is rounding, not a broken MILP
    assert abs(closed_form - objective) <= 1e-6 * max(1.0, objective, time_s), (closed_form, objective)
    return time_s
