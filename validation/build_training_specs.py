"""Turn the published training rows (CSV, as published) into model/cluster/plan specs.

Rows: Narayanan et al. SC'21, Korthikanti et al. MLSys'23 (Megatron-LM) and torchtitan's FSDP2
benchmarks (training_fsdp.csv with its notes in training_fsdp.md).

Run once after editing a CSV: `python validation/build_training_specs.py`. It writes
validation/training.yaml, which `simtune validate train` reads. Settings a table does not
state are marked `assumed` with the reason, so a reader can see exactly what was chosen.
"""

from __future__ import annotations

import csv
import re
from pathlib import Path

import yaml

HERE = Path(__file__).parent
SC21 = "Narayanan et al., SC'21 (arXiv 2104.04473), Table 1"
K23 = "Korthikanti et al., MLSys'23 (arXiv 2205.05198), Table 5 and Figure 1"
SC21_MODEL = {"1.7": "1.7b", "3.6": "3.6b", "7.5": "7.5b", "18.4": "18.4b", "39.1": "39.1b", "76.1": "76.1b",
              "145.6": "145.6b", "310.1": "310.1b", "529.6": "529.6b", "1008.0": "1t"}
K23_MODEL = {"22B": "megatron-gpt-22b", "175B": "gpt3-175b", "530B": "megatron-gpt-529.6b", "1T": "megatron-gpt-1t"}
MEGATRON_2021 = {"gradient_dtype": "fp32", "flash_attention": False, "overlap_grad_reduce": False, "zero_stage": 0}

# torchtitan's FSDP2 rows (training_fsdp.csv; see training_fsdp.md). Settings every row shares, each
# from torchtitan's code at the commits the rows name:
# - zero_stage 3: FSDP2 `fully_shard` shards parameters, gradients and optimizer states.
# - gradient_dtype fp32: `MixedPrecisionPolicy(param_dtype=bfloat16, reduce_dtype=float32)`;
#   `training.mixed_precision_reduce` defaults to "float32" (torchtitan/config_manager.py @3faaa1a,
#   @9dec370; hard-coded float32 in torchtitan/parallelisms/parallelize_llama.py @1ea476e).
# - flash_attention: the model calls `F.scaled_dot_product_attention(..., is_causal=True)`, whose
#   flash kernel the per-op SAC policy names (`_scaled_dot_product_flash_attention`).
# - sequence_parallel with TP: `apply_tp` shards the norms with `SequenceParallel()`
#   (parallelize_llama.py @1ea476e and @9dec370).
# - reshard_after_forward: FSDP2's default; torchtitan keeps only the last block unsharded (without PP).
# - overlap_grad_reduce: FSDP2 reduce-scatters each block's gradients during backward.
FSDP2 = {"zero_stage": 3, "gradient_dtype": "fp32", "flash_attention": True, "overlap_grad_reduce": True,
         "reshard_after_forward": True}
TT_MODEL = {("32", "4096", "128256"): "llama-3-8b", ("80", "8192", "128256"): "llama-3-70b",
            ("126", "16384", "128256"): "llama-3.1-405b", ("40", "5120", "32000"): "llama-2-13b",
            ("80", "8192", "32000"): "llama-2-70b"}
TT_NODE = {"H100 SXM 96GB HBM2e (500W cap)": "8xh100-grand-teton",
           "H100 SXM 95GB HBM2e lower-TDP": "8xh100-hbm2e-94gb", "A100 80GB": "8xa100-80gb"}
PER_OP_SAC = ("per-op SAC as recompute selective_op: torchtitan's policy (the save list of "
              "parallelize_llama.py, the same at @1ea476e, @9dec370 and @820504e) saves the "
              "flash-attention output and every other matmul output and recomputes the rest")
FP8_ALL_GATHER = ("fp8_all_gather true: the table does not give the Float8 flags; docs/float8.md @9dec370 "
                  "launches Float8 with --float8.enable_fsdp_float8_all_gather (the config default is off)")


def cluster(gpus: int) -> str:
    return f"{gpus // 8}x8xa100-80gb" if gpus >= 8 else f"{gpus}xa100-80gb"


def virtual_stages(layers_per_stage: int) -> int:
    """Table 1 says 'interleaved' without the chunk count: the largest v <= 3 dividing the
    stage's layers (Korthikanti et al. use v = 3 for the 175B and 530B models)."""
    return max(v for v in (1, 2, 3) if layers_per_stage % v == 0)


def sc21_rows() -> list[dict]:
    rows = []
    for r in csv.DictReader(open(HERE / "training_megatron_sc21.csv")):
        tp, pp, dp, gbs = (int(r[k]) for k in ("tp", "pp", "dp", "global_batch_size"))
        layers = int(r["num_layers"])
        v = virtual_stages(layers // pp) if pp > 1 else 1
        mbs = gbs // dp if pp == 1 else 1
        plan = {"tp": tp, "pp": pp, "dp": dp, "micro_batch_size": mbs, "global_batch_size": gbs,
                "schedule": "interleaved" if v > 1 else "1f1b", "virtual_stages": v,
                "recompute": "full", **MEGATRON_2021}
        rows.append({
            "id": f"sc21-{SC21_MODEL[r['params_billion']]}", "source": SC21,
            "model": f"megatron-gpt-{SC21_MODEL[r['params_billion']]}", "cluster": cluster(int(r["gpus"])), "plan": plan,
            "assumed": f"micro_batch_size {mbs} and virtual_stages {v} (not in Table 1); no DP overlap (Megatron-LM 2021)",
            "measured": {"tflops_per_device_with_recompute": float(r["tflops_per_gpu"])},
        })
    return rows


def k23_rows() -> list[dict]:
    rows = []
    mem = {r["model"]: r for r in csv.DictReader(open(HERE / "training_korthikanti_memory.csv"))}
    for r in csv.DictReader(open(HERE / "training_korthikanti_mlsys23.csv")):
        tp, pp, v, mbs, gbs = (int(r[k]) for k in ("tp", "pp", "interleave_v", "micro_batch_size", "global_batch_size"))
        base = {"tp": tp, "pp": pp, "dp": 1, "micro_batch_size": mbs, "global_batch_size": gbs,
                "schedule": "interleaved" if v > 1 else "1f1b", "virtual_stages": v, **MEGATRON_2021}
        model = K23_MODEL[r["model"]]
        m = mem[r["model"]]
        for mode, plan in (("full", {**base, "recompute": "full"}),
                           ("sp-selective", {**base, "recompute": "selective", "sequence_parallel": True})):
            rows.append({
                "id": f"k23-{r['model']}-{mode}", "source": K23, "model": model, "cluster": cluster(int(r["gpus"])),
                "plan": plan,
                "measured": {"iteration_time_s": float(r["iteration_s_full_recompute" if mode == "full" else "iteration_s_sp_selective"])},
            })
        rows.append({
            "id": f"k23-{r['model']}-memory", "source": K23, "model": model, "cluster": cluster(int(r["gpus"])),
            "plan": {**base, "recompute": "none"},
            "measured_memory_GiB": {
                "model_states": float(m["model_states_gib"]),
                "activations_no_recompute": float(m["activations_no_recompute_gib"]),
                "activations_sp_selective": float(m["activations_sp_selective_gib"]),
            },
        })
    return rows


def _first_int(text: str) -> int:
    return int(re.match(r"\s*(\d+)", text).group(1))


def _lookup(table: dict, key, field: str, row_id: str) -> str:
    if key not in table:
        raise ValueError(f"{row_id}: {field} {key!r} has no catalog entry here; known: {list(table)}")
    return table[key]


def tt_model(r: dict) -> str:
    return _lookup(TT_MODEL, (r["num_layers"], r["hidden_size"], r["vocab_size"]),
                   "(num_layers, hidden_size, vocab_size)", r["id"])


def tt_runtime(r: dict) -> dict:
    """Precision and torch.compile, from the bracket of `zero_stage_or_fsdp`."""
    setting = re.search(r"\[(.*)\]", r["zero_stage_or_fsdp"]).group(1)
    precision = "fp8" if "Float8" in setting else "bf16"
    return {"precision": precision, "torch_compile": "compile" in setting}


def tt_recompute(r: dict) -> tuple[str, list[str]]:
    ac = r["activation_checkpointing"]
    if ac == "full":
        return "full", []
    if ac == "none":
        return "none", []
    notes = [PER_OP_SAC]
    if "(table)" in ac:  # the table says 'selective'; the config at the named commit says which kind
        notes.insert(0, "the table says 'selective'; the default toml at the named commit sets "
                        "selective_ac_option 'op'")
    return "selective_op", notes


def tt_rows() -> list[dict]:
    rows = []
    for r in csv.DictReader(open(HERE / "training_fsdp.csv")):
        tp, pp, dp, gpus = (int(r[k]) for k in ("tp", "pp", "dp", "num_gpus"))
        mbs, gbs, seq = (_first_int(r[k]) for k in ("micro_batch_size", "global_batch_size", "seq_length"))
        model = tt_model(r)
        runtime = tt_runtime(r)
        recompute, assumed = tt_recompute(r)
        plan = {"tp": tp, "pp": pp, "dp": dp, "micro_batch_size": mbs, "global_batch_size": gbs,
                "seq_length": seq, "recompute": recompute, **FSDP2, "precision": runtime["precision"],
                "fused_elementwise": runtime["torch_compile"]}  # eager PyTorch runs one kernel per op
        if tp > 1:
            plan["sequence_parallel"] = True
        if runtime["precision"] == "fp8":
            plan["fp8_all_gather"] = True
            assumed.append(FP8_ALL_GATHER)
        node = _lookup(TT_NODE, r["device"], "device", r["id"])
        if node == "8xa100-80gb":
            assumed.append("8 GPUs per node on NVLink with 200 Gb/s per GPU between nodes (8xa100-80gb): "
                           "node size and interconnect are not stated")
        elif "not stated" in r["gpus_per_node"] or "not stated" in r["inter_node_GBps_per_gpu"]:
            assumed.append("8 GPUs per node (implied by TP 8) and 50 GB/s per GPU between nodes as on "
                           "torchtitan's Grand Teton hosts: the source states neither")
        if "preset toml has compile=true" in r["zero_stage_or_fsdp"]:
            assumed.append("torch.compile: the table's row says Optimizations=None; the preset toml @3faaa1a "
                           "sets compile = true (and enables Float8 and async TP, which this row leaves off)")
        tps = float(r["measured_value"].split(";")[0])
        measured = {"tokens_per_s_per_device": tps,
                    "iteration_time_s": round(gbs * seq / (tps * gpus), 6)}
        if ";" in r["measured_value"]:
            measured["mfu"] = float(r["measured_value"].split(";")[1])
        row = {"id": r["id"], "source": r["source"], "model": model,
               "cluster": f"{gpus // 8}x{node}" if gpus > 8 else node, "plan": plan, "runtime": runtime}
        if assumed:
            row["assumed"] = "; ".join(assumed)
        row["measured"] = measured
        rows.append(row)
    return rows


def check_model_shapes() -> None:
    """The catalog models the FSDP rows name have the CSV's shapes (seq_length goes in each plan)."""
    from simulator.specs.catalog import load_model

    fields = ("num_layers", "hidden_size", "num_attention_heads", "num_kv_heads", "ffn_hidden_size",
              "vocab_size")
    for r in csv.DictReader(open(HERE / "training_fsdp.csv")):
        model = load_model(tt_model(r))
        for f in fields:
            if getattr(model, f) != int(r[f]):
                raise ValueError(f"{r['id']}: {f} of {model.name} is {getattr(model, f)}; "
                                 f"the CSV says {r[f]}")


if __name__ == "__main__":
    import sys

    sys.path.insert(0, str(HERE.parent))
    check_model_shapes()
    doc = {"note": __doc__.strip().splitlines()[0], "rows": sc21_rows() + k23_rows() + tt_rows()}
    (HERE / "training.yaml").write_text(yaml.safe_dump(doc, sort_keys=False, width=120))
    print(f"wrote {len(doc['rows'])} rows to validation/training.yaml")
