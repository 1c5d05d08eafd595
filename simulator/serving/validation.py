"""Serving validation: predicted vs published for the rows in validation/serving_*.csv.

- TensorRT-LLM static batching (docs/source/performance.md, v0.5/v0.6.1, A100 fp16): output
  tokens/s per GPU for a batch of fixed-length requests, and first-token latency of a lone
  request. These check the per-iteration cost model. Llama (v1) 7B and 70B have the shapes
  of the catalog's llama-2-7b and llama-2-70b (Llama-2-70B adds GQA; the published 70B rows
  are Llama-2-70B class).
- vLLM serving OPT-13B on one A100-80GB with ShareGPT requests arriving as a Poisson
  process (DistServe artifact's ground truth): TTFT and TPOT percentiles and request
  throughput. These check the scheduler and the KV capacity. The requests replayed are the
  measured runs' own (arrival, prompt and output lengths per request, transcribed from the
  artifact's records into validation/traces/), and the deployment is the artifact's vLLM
  configuration (block 16, GPU memory utilization 0.92, 65,536 batched tokens, 1,024
  sequences, 16 GiB swap space) with the engine profile of the artifact's vLLM 0.2 API server
  with Ray (catalog engine `vllm-0.2-ray`: CPU time per step, per sequence and per context
  token; `simulator/serving/engine_overhead.py` cites what sizes each).
Targets: median absolute error <= 15% on throughput, and on median latencies. Per vLLM row
(the load rows are where a scheduler or engine cost that is missing shows): every median TTFT
and TPOT within 25% and every throughput within 10% (`ROW_TARGETS`; `passed` is whether the
worst row meets it).
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from simulator.serving.simulate import simulate_serving
from simulator.specs.catalog import load_cluster
from simulator.specs.hardware import ClusterSpec
from simulator.specs.profile import profile_applies
from simulator.training.validation import DATA_DIR, ValidationResult

TARGETS = {"throughput": 0.15, "median latency": 0.15}
ROW_TARGETS = {  # summary group: (target on every row, quantities checked)
    "vllm rows: median TTFT, TPOT": (0.25, ("TTFT p50", "TPOT p50")),
    "vllm rows: throughput": (0.10, ("requests/s",)),
}
TRT_MODELS = {"llama-7b": "llama-2-7b", "llama-70b": "llama-2-70b"}
TRT_CLUSTER = {1: "1xa100-80gb", 4: "4xa100-80gb"}
TRT_SOURCE = "TensorRT-LLM docs/source/performance.md (v0.5 / v0.6.1), A100 fp16"
VLLM_ENGINE = "vllm-0.2-ray"  # the artifact ran vLLM 0.2 behind its API server, engine and worker in Ray actors
VLLM_SOURCE = "vLLM OPT-13B on A100-80GB, ShareGPT, Poisson (DistServe artifact ground truth)"


def _row(id_, source, group, quantity, unit, predicted, measured, costs="datasheet"):
    return {"id": id_, "source": source, "group": group, "quantity": quantity, "unit": unit,
            "predicted": predicted, "measured": measured, "error": (predicted - measured) / measured,
            "costs": costs}


def _cluster(name: str, profile: str | Path | None) -> ClusterSpec:
    """The named cluster, measured by `profile` when the profile is of its device."""
    cluster = load_cluster(name)
    if profile is not None and profile_applies(cluster, profile):
        return load_cluster(cluster, profile=profile)
    return cluster


def _trt_rows(path: Path, profile: str | Path | None = None) -> list[dict]:
    out = []
    for r in csv.DictReader(open(path)):
        tp, batch = int(r["tp"]), int(r["batch_size"])
        inp, outp = int(r["input_len"]), int(r["output_len"])
        model = TRT_MODELS[r["model"]]
        workload = {"num_requests": batch, "input_tokens": {"distribution": "fixed", "value": inp},
                    "output_tokens": {"distribution": "fixed", "value": outp}}
        deployment = {"prefill": {"tp": tp}, "max_num_seqs": batch,
                      "max_batched_tokens": max(inp, min(batch * inp, 16384))}
        cluster = _cluster(TRT_CLUSTER[tp], profile)
        rep = simulate_serving(model, cluster, deployment, workload)
        costs = cluster.device.source_of("gemm")
        id_ = f"trt-{r['model']}-tp{tp}-b{batch}-{inp}x{outp}"
        if r["metric"] == "output_throughput":
            out.append(_row(id_, TRT_SOURCE, "throughput", "output tokens/s per GPU", "tok/s",
                            rep.output_tokens_per_s / tp, float(r["value"]), costs))
        else:
            out.append(_row(id_, TRT_SOURCE, "median latency", "first-token latency", "ms",
                            rep.ttft_s["p50"] * 1e3, float(r["value"]), costs))
    return out


def _vllm_rows(path: Path, profile: str | Path | None = None) -> list[dict]:
    out, d = [], path.parent
    for r in csv.DictReader(open(path)):
        n = int(r["num_requests"])
        trace = d / "traces" / f"distserve_vllm_opt13b_{n}_{r['rate_req_per_s']}.csv"
        workload = {"num_requests": n, "trace": str(trace)}
        deployment = {"prefill": {"tp": 1}, "block_size": 16, "gpu_memory_utilization": 0.92,
                      "max_batched_tokens": 65536, "max_num_seqs": 1024, "engine": VLLM_ENGINE}
        cluster = _cluster("1xa100-80gb", profile)
        rep = simulate_serving("opt-13b", cluster, deployment, workload)
        id_ = f"vllm-opt13b-rate{r['rate_req_per_s']}"
        pairs = [("ttft_p50_ms", "median latency", "TTFT p50", rep.ttft_s["p50"] * 1e3, "ms"),
                 ("tpot_p50_ms", "median latency", "TPOT p50", rep.tpot_s["p50"] * 1e3, "ms"),
                 ("ttft_p90_ms", "tail latency", "TTFT p90", rep.ttft_s["p90"] * 1e3, "ms"),
                 ("tpot_p90_ms", "tail latency", "TPOT p90", rep.tpot_s["p90"] * 1e3, "ms"),
                 ("throughput_req_per_s", "throughput", "requests/s", rep.requests_per_s, "req/s")]
        for column, group, quantity, predicted, unit in pairs:
            if r[column]:
                out.append(_row(id_, VLLM_SOURCE, group, quantity, unit, predicted, float(r[column]),
                                cluster.device.source_of("gemm")))
    return out


def validate_serving(data_dir: str | Path | None = None, profile: str | Path | None = None) -> ValidationResult:
    """Simulate every published serving row; median absolute error per group. With `profile`,
    rows on the kind of device it measured use its costs (each row's `costs` says which)."""
    d = Path(data_dir or DATA_DIR)
    rows = _trt_rows(d / "serving_trtllm_a100.csv", profile) + _vllm_rows(d / "serving_vllm_opt13b.csv", profile)
    summary = {}
    for group in ("throughput", "median latency", "tail latency"):
        errs = np.array([abs(r["error"]) for r in rows if r["group"] == group])
        target = TARGETS.get(group)
        summary[group] = {"median_abs_error": float(np.median(errs)), "max": float(errs.max()),
                          "target": target, "passed": None if target is None else bool(np.median(errs) <= target),
                          "n": int(errs.size)}
    for group, (target, quantities) in ROW_TARGETS.items():
        errs = np.array([abs(r["error"]) for r in rows
                         if r["id"].startswith("vllm") and r["quantity"] in quantities])
        summary[group] = {"median_abs_error": float(np.median(errs)), "max": float(errs.max()),
                          "target": target, "passed": bool(errs.max() <= target), "n": int(errs.size)}
    return ValidationResult(rows, summary)
