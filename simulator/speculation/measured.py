"""Speculative step costs and acceptance measured on a real machine, and what they imply.

Two formats hold such measurements: a profile directory written by `simtune profile` (its
`decode` table: decode and verification steps of the real decoder) and the JSON of the
speculative benchmarks (`benchmarks/bench_speculative*.py`: a step-cost profile plus
acceptance rates, per workload class for the continuous-batching one). `measured_step_cost`
reads either into a `MeasuredStepCost`, which the policy table of `model.py` prices steps
with; `measured_acceptance` reads the acceptance rates; the rest compares a measurement's
own best k with the model's.
"""

from __future__ import annotations

import bisect
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from simulator.errors import SpecError
from simulator.specs.profile import HardwareProfile, load_profile, resolve_profile_path
from simulator.specs.serving import AcceptanceSpec
from simulator.speculation.model import (
    PolicyTable,
    policy_table,
)


def monotone_fit(values: Sequence[float]) -> list[float]:
    """The least-squares non-decreasing fit of a sequence (pool adjacent violators)."""
    blocks: list[list[float]] = []  # [mean, weight]
    for v in values:
        blocks.append([float(v), 1.0])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            (m2, w2), (m1, w1) = blocks.pop(), blocks.pop()
            blocks.append([(m1 * w1 + m2 * w2) / (w1 + w2), w1 + w2])
    return [m for m, w in blocks for _ in range(int(w))]


class MeasuredStepCost:
    """Step costs measured on a real machine, interpolated in the batch size and tokens per sequence.

    `profile` holds {"context": c, "target": [{"batch_size", "tokens_per_seq", "seconds"}],
    "draft": [{"batch_size", "seconds"}]}: the step-cost block of a speculative benchmark's
    JSON (`benchmarks/bench_speculative*.py`). A profile directory written by `simtune
    profile` becomes one through `from_decode_table`; `measured_step_cost` reads either.
    Measured times are used as they are: on a CPU some shapes are systematically
    faster than smaller ones (matmul blocking: 2 x 8 tokens can beat 2 x 7), and a real k*
    follows them. With `monotone=True`, the times at each batch size are replaced by their
    least-squares non-decreasing fit in the tokens per sequence, for noisy profiles. Batch
    sizes between measured ones interpolate linearly, and so do tokens per sequence between
    measured ones (a profile directory verifies k = 2, 4, 8 only); outside the measured
    ranges it raises ValueError. The context is the one the costs were measured at.
    """

    def __init__(self, profile: dict[str, Any], monotone: bool = False):
        self.context = float(profile["context"])
        by_batch: dict[int, dict[int, float]] = {}
        for row in profile["target"]:
            by_batch.setdefault(int(row["batch_size"]), {})[int(row["tokens_per_seq"])] = float(row["seconds"])
        target: dict[int, dict[int, float]] = {}
        for b, times in by_batch.items():
            ns = sorted(times)
            fitted = monotone_fit([times[n] for n in ns]) if monotone else [times[n] for n in ns]
            for n, s in zip(ns, fitted):
                target.setdefault(n, {})[b] = s
        self._target = {n: (sorted(t), [t[b] for b in sorted(t)]) for n, t in target.items()}
        self._ns = sorted(self._target)
        draft = {int(r["batch_size"]): float(r["seconds"]) for r in profile.get("draft", [])}
        self._draft = (sorted(draft), [draft[b] for b in sorted(draft)]) if draft else None

    @classmethod
    def from_decode_table(cls, df, context: float | None = None, where: str = "decode.csv",
                          monotone: bool = False) -> MeasuredStepCost:
        """The target's steps from a profile directory's decode table (`profiler/decode.py`):
        its decode rows (one token per sequence) and verify rows (k + 1), at the measured
        context nearest `context` among those with verify rows (default: the one with the
        most verify rows, the smallest on a tie). The table measures no draft: the draft
        step costs nothing (n-gram prompt lookup: ~10 us per sequence on a CPU)."""
        phases = set(df["phase"])
        verify = df[df["phase"] == "verify"]
        if "decode" not in phases or verify.empty:
            raise SpecError(f"{where}: phase", sorted(map(str, phases)), (
                "the target's step costs need decode and verify rows; re-run `simtune profile --ops decode`"))
        counts = verify.groupby("context").size()
        contexts = sorted(int(c) for c in counts.index)
        if context is None:
            chosen = max(contexts, key=lambda c: (counts[c], -c))
        else:
            chosen = min(contexts, key=lambda c: (abs(c - context), c))
        rows = df[df["phase"].isin(("decode", "verify")) & (df["context"] == chosen)]
        if not (rows["new_tokens"] == 1).any():
            raise SpecError(f"{where}: decode rows at context {chosen}", None, (
                "are missing: the verify rows need the one-token step at the same context"))
        target = [{"batch_size": int(r.batch), "tokens_per_seq": int(r.new_tokens), "seconds": float(r.median_s)}
                  for r in rows.itertuples()]
        return cls({"context": chosen, "target": target, "draft": []}, monotone)

    @staticmethod
    def _interp(table: tuple[list[int], list[float]], batch: int, what: str) -> float:
        sizes, secs = table
        if not sizes[0] <= batch <= sizes[-1]:
            raise ValueError(f"batch = {batch}: outside the measured {what} batch sizes {sizes[0]}..{sizes[-1]}")
        return float(np.interp(batch, sizes, secs))

    @property
    def batch_sizes(self) -> list[int]:
        """The measured batch sizes of one-token steps that every measured tokens per sequence covers."""
        lo = max(sizes[0] for sizes, _ in self._target.values())
        hi = min(sizes[-1] for sizes, _ in self._target.values())
        return [b for b in self._target[1][0] if lo <= b <= hi] or [lo]

    @property
    def max_tokens_per_seq(self) -> int:
        return self._ns[-1]

    def target_s(self, batch: int, tokens_per_seq: int, context: float) -> float:
        n, ns = tokens_per_seq, self._ns
        if not ns[0] <= n <= ns[-1]:
            raise ValueError(f"tokens_per_seq = {n}: not measured (profile has {ns[0]}..{ns[-1]})")
        if n in self._target:
            return self._interp(self._target[n], batch, "target")
        hi = ns[bisect.bisect_right(ns, n)]
        lo = ns[bisect.bisect_right(ns, n) - 1]
        t_lo = self._interp(self._target[lo], batch, "target")
        t_hi = self._interp(self._target[hi], batch, "target")
        return t_lo + (t_hi - t_lo) * (n - lo) / (hi - lo)

    def draft_s(self, batch: int, context: float) -> float:
        return 0.0 if self._draft is None else self._interp(self._draft, batch, "draft")


# --- measurements on a real machine: the two formats, one loader ----------------------------------


def read_measurement(path: str | Path) -> dict[str, Any] | HardwareProfile:
    """A profile directory (path or catalog name) or a speculative benchmark's JSON, checked
    to hold step costs (a JSON's "profile" block)."""

    where = resolve_profile_path(path)
    if where.is_dir():
        return load_profile(where)
    if not where.exists():
        raise SpecError("profile", str(path), "no such file or directory; give a profile directory written by "
                        "`simtune profile` or a speculative benchmark's JSON (benchmarks/results/speculative_*.json)")
    try:
        data = json.loads(where.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise SpecError("profile", str(path), f"is neither a profile directory nor a JSON file: {err}") from None
    if not isinstance(data, dict) or "profile" not in data:
        raise SpecError(f"{path}: profile", None, "is missing: a speculative benchmark's JSON keeps its step "
                        "costs under 'profile' (give a profile directory or a benchmark JSON)")
    return data


def measured_step_cost(source: dict[str, Any] | HardwareProfile | str | Path, context: float | None = None,
                       monotone: bool = False, where: str = "measurement") -> MeasuredStepCost:
    """The one loader of measured step costs: a profile directory (its decode table, at the
    measured context nearest `context`) or a benchmark's results (their "profile" block)."""
    if isinstance(source, (str, Path)):
        where, source = str(source), read_measurement(source)
    if isinstance(source, HardwareProfile):
        from simulator.specs.profile import TABLES  # noqa: PLC0415

        return MeasuredStepCost.from_decode_table(source.frame("decode"), context,
                                                  str(source.root / TABLES["decode"].file), monotone)
    if not isinstance(source, dict) or "profile" not in source:
        raise SpecError(f"{where}: profile", None, "is missing: the step costs of a benchmark's results")
    return MeasuredStepCost(_checked_block(source["profile"], f"{where}: profile"), monotone)


def _checked_block(block: Any, where: str) -> dict[str, Any]:
    """A benchmark's step-cost block, every field checked (errors name the field)."""
    if not isinstance(block, dict):
        raise SpecError(where, type(block).__name__, "must be an object with context, target and draft")
    ctx = block.get("context")
    if not isinstance(ctx, (int, float)) or ctx <= 0:
        raise SpecError(f"{where}.context", ctx, "must be a number > 0 (context tokens of the measurement)")
    for part, fields in (("target", ("batch_size", "tokens_per_seq", "seconds")), ("draft", ("batch_size", "seconds"))):
        rows = block.get(part, [] if part == "draft" else None)
        if not isinstance(rows, list) or (part == "target" and not rows):
            raise SpecError(f"{where}.{part}", rows, "must be a non-empty list of rows" if part == "target"
                            else "must be a list of rows")
        for i, row in enumerate(rows):
            for name in fields:
                value = row.get(name) if isinstance(row, dict) else None
                ok = isinstance(value, (int, float)) and (value > 0 if name == "seconds" else value >= 1)
                if not ok:
                    raise SpecError(f"{where}.{part}[{i}].{name}", value,
                                    "must be a number > 0" if name == "seconds" else "must be an integer >= 1")
    if not any(int(r["tokens_per_seq"]) == 1 for r in block["target"]):
        raise SpecError(f"{where}.target", "no tokens_per_seq 1", "needs the one-token step (k = 0)")
    return block


RATE_BOUND = 1e-3
"""How close to 0 or 1 a measured per-request acceptance rate enters the model (see below)."""


def measured_acceptance(results: dict[str, Any], workload_class: str | None = None,
                        where: str = "measurement") -> tuple[AcceptanceSpec, str]:
    """Per-request acceptance rates of a benchmark's results, and the field they came from.

    `bench_speculative.py` keeps them under "acceptance"; the continuous-batching benchmark
    keeps one set per workload class under "classes" (`workload_class`, default: the first).
    A request whose drafts were all rejected or all accepted measures a rate of exactly 0 or 1;
    the acceptance model is geometric on (0, 1) (`AcceptanceSpec` refuses the bounds), so such a
    rate enters as 0.001 or 0.999 (`RATE_BOUND`): it stays the most extreme request of the set."""
    classes = results.get("classes")
    if workload_class is not None or "acceptance" not in results:
        if not isinstance(classes, dict) or not classes:
            if workload_class is not None:
                raise SpecError("workload_class", workload_class, f"{where} has no workload classes (only the "
                                "continuous-batching benchmark keeps acceptance per class)")
            raise SpecError(f"{where}: acceptance", None, "is missing: no 'acceptance.per_request' and no "
                            "'classes.<name>.acceptance.per_request'; give the acceptance rates another way")
        name = next(iter(classes)) if workload_class is None else workload_class
        if name not in classes:
            raise SpecError("workload_class", name, f"not in {where}; choose from {', '.join(classes)}")
        block, field_path = classes[name], f"classes.{name}.acceptance.per_request"
    else:
        block, field_path = results, "acceptance.per_request"
    acceptance = block.get("acceptance") if isinstance(block, dict) else None
    rates = acceptance.get("per_request") if isinstance(acceptance, dict) else None
    if not isinstance(rates, list) or not rates:
        raise SpecError(f"{where}: {field_path}", rates, "must be a non-empty list of per-request rates")
    bad = [a for a in rates if not isinstance(a, (int, float)) or not 0 <= a <= 1]
    if bad:
        raise SpecError(f"{where}: {field_path}", bad[0], "every rate must be a number in [0, 1]")
    clipped = [min(max(float(a), RATE_BOUND), 1 - RATE_BOUND) for a in rates]
    return AcceptanceSpec(distribution="empirical", values=clipped), field_path



# --- a measurement as a whole: acceptance, policy, comparison ---------------------------------

def acceptance_of_measurement(results: dict[str, Any], workload_class: str | None = None) -> AcceptanceSpec:
    """The per-request acceptance rates a measurement estimated, as an empirical distribution."""
    return measured_acceptance(results, workload_class)[0]


def policy_table_of_measurement(results: dict[str, Any], k_max: int | None = None) -> PolicyTable:
    """k*(b) predicted from a measurement's step-cost profile and acceptance rates alone."""
    cost = measured_step_cost(results)
    k_max = cost.max_tokens_per_seq - 1 if k_max is None else k_max
    return policy_table(cost, acceptance_of_measurement(results), cost.batch_sizes, k_max, cost.context)


def policy_from_measurement(results: dict[str, Any]) -> dict[int, int]:
    """Batch size -> k, for the adaptive run of `benchmarks/bench_speculative.py`."""
    return policy_table_of_measurement(results).as_dict()


def measurement_view(results: dict[str, Any], workload: str | None = None) -> dict[str, Any]:
    """One workload of a measurement as {profile, grid, acceptance, adaptive}: the continuous-
    batching benchmark keeps one block per workload class under "classes"."""
    if workload is None:
        return results
    return {"profile": results["profile"], **results["classes"][workload]}


def compare_with_measurement(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Per batch size: the model's k*(b) among the measured k, the measured best k, and the
    measured throughputs of both, of k = 0 and of the adaptive run."""
    table = policy_table_of_measurement(results, max(int(r["k"]) for r in results["grid"]))
    grid: dict[int, dict[int, float]] = {}
    for row in results["grid"]:
        grid.setdefault(int(row["batch_size"]), {})[int(row["k"])] = float(row["output_tokens_per_s"])
    adaptive = {int(r["batch_size"]): float(r["output_tokens_per_s"]) for r in results.get("adaptive", [])}
    out = []
    for row in table.rows:
        measured = grid.get(row.batch_size)
        if not measured:
            continue
        model_k = max(measured, key=lambda k: row.tokens_per_s_by_k[k])  # among the k that were run
        best_k = max(measured, key=measured.get)
        out.append({
            "batch_size": row.batch_size, "model_k": model_k, "model_k_any": row.k, "measured_best_k": best_k,
            "measured_k0_tokens_per_s": measured.get(0), "measured_best_tokens_per_s": measured[best_k],
            "measured_at_model_k_tokens_per_s": measured[model_k],
            "adaptive_tokens_per_s": adaptive.get(row.batch_size),
            "predicted_speedup": row.tokens_per_s_by_k[model_k] / row.tokens_per_s_by_k[0],
            "measured_speedup": measured[best_k] / measured[0] if 0 in measured else None,
        })
    return out
