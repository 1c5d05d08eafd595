"""Requests to serve, from a WorkloadSpec: synthetic lengths and arrivals, presets, or a trace.

`generate_requests` returns `Request`s sorted by arrival time, with ids 0..N-1 in that
order. Synthetic workloads draw arrivals, input lengths and output lengths from three
independent child streams of `numpy.random.SeedSequence(seed)`, so that changing the arrival
rate leaves the lengths unchanged (common random numbers across a rate sweep).

Length distributions (`LengthDist`):
- fixed: every request has `value` tokens;
- uniform: integers drawn uniformly from [min, max];
- lognormal: `mean` is the mean of the distribution itself (not of the underlying normal),
  so mu = ln(mean) - sigma^2 / 2; samples are rounded and clipped to [min, max], which moves
  the realised mean a little (see `PRESETS`).

Traces are CSV (header naming arrival_s or arrival_time, input_tokens, output_tokens; extra
columns are ignored) or JSONL (one object per line with the same keys). The first
`num_requests` rows are used. The arrival column may be left out (all requests at 0); a
`poisson` arrival in the spec replaces the trace's times, keeping its lengths in row order.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from simulator.errors import SpecError
from simulator.specs.serving import Arrival, LengthDist, WorkloadSpec


@dataclass(frozen=True, slots=True)
class Request:
    id: int
    arrival_s: float
    input_tokens: int
    output_tokens: int
    prefix_group: int | None = None   # its prompt opens with shared prefix number ... (WorkloadSpec.shared_prefix)
    prefix_tokens: int = 0            # ... of this many tokens (counted in input_tokens)


# -- presets --------------------------------------------------------------------------------


class Preset(NamedTuple):
    input_tokens: LengthDist
    output_tokens: LengthDist
    source: str


PRESETS: dict[str, Preset] = {
    # Means from Kwon et al. (SOSP'23, vLLM), Fig. 11a: ShareGPT has mean input 161.31 and
    # mean output 337.99 tokens. Only the means are published there; the lognormal shape,
    # sigma = 1.0 and the [4, 2048] clipping are our assumptions. After clipping the realised
    # means are about 161 (input) and 327 (output, 3% below the published mean).
    "sharegpt-like": Preset(
        LengthDist(distribution="lognormal", mean=161.31, sigma=1.0, min=4, max=2048),
        LengthDist(distribution="lognormal", mean=337.99, sigma=1.0, min=4, max=2048),
        "means: Kwon et al. SOSP'23 Fig. 11a; spread and clipping assumed",
    ),
    # NOT published figures: assumptions meant to resemble the arXiv summarization dataset
    # (Cohan et al., NAACL'18) as used by Sarathi-Serve and Seesaw: long documents, short
    # abstracts. Realised means after clipping: about 7,900 (input) and 200 (output) tokens.
    "arxiv-summarization-like": Preset(
        LengthDist(distribution="lognormal", mean=8000.0, sigma=0.4, min=1024, max=16000),
        LengthDist(distribution="lognormal", mean=200.0, sigma=0.5, min=32, max=1024),
        "assumed to resemble arXiv summarization (Cohan et al. 2018); not published statistics",
    ),
}
"""Length distributions of each preset; the one place to replace them with better data."""


# -- synthetic ------------------------------------------------------------------------------


def sample_lengths(dist: LengthDist, n: int, rng: np.random.Generator) -> np.ndarray:
    """`n` token lengths (int64) drawn from `dist`."""
    if dist.distribution == "fixed":
        return np.full(n, dist.value, dtype=np.int64)
    if dist.distribution == "uniform":
        return rng.integers(dist.min, dist.max, size=n, endpoint=True, dtype=np.int64)
    mu = math.log(dist.mean) - dist.sigma**2 / 2  # so that E[X] = dist.mean before clipping
    samples = np.rint(rng.lognormal(mu, dist.sigma, size=n))
    return np.clip(samples, dist.min, dist.max).astype(np.int64)


def sample_arrivals(arrival: Arrival, n: int, rng: np.random.Generator) -> np.ndarray:
    """`n` arrival times (s), non-decreasing: all 0 offline, or a Poisson process."""
    if arrival.kind_ == "offline":
        return np.zeros(n)
    return np.cumsum(rng.exponential(1.0 / arrival.rate_per_s, size=n))


def _streams(seed: int) -> list[np.random.Generator]:
    """Independent generators for arrivals, input lengths and output lengths."""
    return [np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(3)]


def _prefix_stream(seed: int) -> np.random.Generator:
    """The generator of shared-prefix groups: a fourth child of the same seed (spawning is by
    index, so the other three streams, and workloads without prefixes, do not change)."""
    return np.random.default_rng(np.random.SeedSequence(seed).spawn(4)[3])


def generate_requests(workload: WorkloadSpec, base_dir: Path | None = None) -> list[Request]:
    """The workload's requests, sorted by arrival; relative trace paths resolve in base_dir."""
    arrival_rng, input_rng, output_rng = _streams(workload.seed)
    if workload.trace is not None:
        arrivals, inputs, outputs = load_trace(_resolve(workload.trace, base_dir),
                                               workload.num_requests)
        if workload.arrival.kind_ == "poisson":
            arrivals = sample_arrivals(workload.arrival, len(inputs), arrival_rng).tolist()
        return _requests(arrivals, inputs, outputs, workload)
    if workload.preset is not None:
        input_dist, output_dist, _ = PRESETS[workload.preset]
    else:
        input_dist, output_dist = workload.input_tokens, workload.output_tokens
    n = workload.num_requests
    return _requests(sample_arrivals(workload.arrival, n, arrival_rng).tolist(),
                     sample_lengths(input_dist, n, input_rng).tolist(),
                     sample_lengths(output_dist, n, output_rng).tolist(), workload)


def _requests(arrivals: list[float], inputs: list[int], outputs: list[int],
              workload: WorkloadSpec) -> list[Request]:
    """Requests in arrival order; with a shared prefix, each prompt is one of the groups'
    prefixes followed by its drawn tokens (in the order the requests were drawn)."""
    order = sorted(range(len(arrivals)), key=arrivals.__getitem__)  # stable: ties keep row order
    prefix = workload.shared_prefix
    if prefix is None:
        return [Request(i, arrivals[j], inputs[j], outputs[j]) for i, j in enumerate(order)]
    groups = _prefix_stream(workload.seed).integers(prefix.groups, size=len(arrivals)).tolist()
    return [Request(i, arrivals[j], prefix.tokens + inputs[j], outputs[j], groups[j], prefix.tokens)
            for i, j in enumerate(order)]


def describe_lengths(requests: list[Request]) -> dict[str, float]:
    """Mean, median and 90th percentile of input and output lengths (tokens)."""
    if not requests:
        raise ValueError("describe_lengths: no requests")
    out: dict[str, float] = {"num_requests": len(requests)}
    for name in ("input_tokens", "output_tokens"):
        values = np.fromiter((getattr(r, name) for r in requests), dtype=np.int64,
                             count=len(requests))
        out[f"{name}_mean"] = float(values.mean())
        out[f"{name}_p50"] = float(np.percentile(values, 50))
        out[f"{name}_p90"] = float(np.percentile(values, 90))
    return out


# -- traces ---------------------------------------------------------------------------------

ARRIVAL_KEYS = ("arrival_s", "arrival_time")
LENGTH_KEYS = ("input_tokens", "output_tokens")


def _resolve(trace: str, base_dir: Path | None) -> Path:
    path = Path(trace).expanduser()
    if not path.is_absolute():
        path = (base_dir if base_dir is not None else Path.cwd()) / path
    if not path.is_file():
        raise SpecError("workload.trace", trace, f"no such file: {path}")
    return path


def load_trace(path: Path, limit: int | None = None) -> tuple[list[float], list[int], list[int]]:
    """Arrival times (s), input and output lengths of a trace's first `limit` rows."""
    suffix = path.suffix.lower()
    if suffix == ".csv":
        rows = _csv_rows(path)
    elif suffix in (".jsonl", ".ndjson"):
        rows = _jsonl_rows(path)
    else:
        raise SpecError("workload.trace", str(path), "must be a .csv or .jsonl file")
    arrivals: list[float] = []
    inputs: list[int] = []
    outputs: list[int] = []
    for where, row in rows:
        if limit is not None and len(inputs) >= limit:
            break
        arrivals.append(_arrival(where, row))
        inputs.append(_length(where, row, "input_tokens"))
        outputs.append(_length(where, row, "output_tokens"))
    if not inputs:
        raise SpecError("workload.trace", str(path), "has no requests")
    return arrivals, inputs, outputs


def _csv_rows(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        missing = [k for k in LENGTH_KEYS if k not in header]
        if missing:
            raise SpecError(f"{path}:1", ",".join(header),
                            f"header must name {', '.join(missing)} "
                            f"(and optionally {' or '.join(ARRIVAL_KEYS)})")
        for row in reader:  # DictReader skips blank lines itself
            yield f"{path}:{reader.line_num}", row


def _jsonl_rows(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    with path.open() as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{line_no}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise SpecError(where, line.strip()[:80], f"not valid JSON ({err.msg})") from None
            if not isinstance(row, dict):
                raise SpecError(where, row, "must be a JSON object with "
                                            "arrival_s, input_tokens, output_tokens")
            yield where, row


def _arrival(where: str, row: dict[str, Any]) -> float:
    key = next((k for k in ARRIVAL_KEYS if k in row), None)
    if key is None:
        return 0.0
    value = row[key]
    try:
        if isinstance(value, bool):
            raise ValueError
        seconds = float(value)
    except (TypeError, ValueError):
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds >= 0):
        raise SpecError(where, value, f"{key} must be a finite number of seconds >= 0")
    return seconds


def _length(where: str, row: dict[str, Any], key: str) -> int:
    if key not in row:
        raise SpecError(where, None, f"{key} is required")
    value = row[key]
    tokens = _as_int(value)
    if tokens is None or tokens < 1:
        raise SpecError(where, value, f"{key} must be a positive integer")
    return tokens


def _as_int(value: Any) -> int | None:
    """An integer from an int, an integral float or their text; None otherwise."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            pass
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return int(number) if number.is_integer() else None
