"""Turn the published training rows (CSV, as published) into model/cluster/plan specs.

Run once after editing a CSV: `python validation/build_training_specs.py`. It writes
validation/training.yaml, which `simtune validate train` reads. Settings a table does not
state are marked `assumed` with the reason, so a reader can see exactly what was chosen.
"""

from __future__ import annotations

import csv
from pathlib import Path

import yaml

HERE = Path(__file__).parent
SC21 = "Narayanan et al., SC'21 (arXiv 2104.04473), Table 1"
K23 = "Korthikanti et al., MLSys'23 (arXiv 2205.05198), Table 5 and Figure 1"
SC21_MODEL = {"1.7": "1.7b", "3.6": "3.6b", "7.5": "7.5b", "18.4": "18.4b", "39.1": "39.1b", "76.1": "76.1b",
              "145.6": "145.6b", "310.1": "310.1b", "529.6": "529.6b", "1008.0": "1t"}
K23_MODEL = {"22B": "megatron-gpt-22b", "175B": "gpt3-175b", "530B": "megatron-gpt-529.6b", "1T": "megatron-gpt-1t"}
MEGATRON_2021 = {"gradient_dtype": "fp32", "flash_attention": False, "overlap_grad_reduce": False, "zero_stage": 0}


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


if __name__ == "__main__":
    doc = {"note": __doc__.strip().splitlines()[0], "rows": sc21_rows() + k23_rows()}
    (HERE / "training.yaml").write_text(yaml.safe_dump(doc, sort_keys=False, width=120))
    print(f"wrote {len(doc['rows'])} rows to validation/training.yaml")
