# The two commands of the README: `make demo` runs the main job on the embedded default, `make test` runs
# the tests. Both build their own virtual environment on a fresh machine.
SHELL := /bin/bash
.DEFAULT_GOAL := help
VENV ?= .venv
PYTHON := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=
# torch first (its pin comes from pyproject.toml), then DeepSpeed without build isolation: DeepSpeed ships
# only an sdist whose setup imports torch, and an isolated build would fetch a second multi-GB torch.
pin = $(shell grep -oE '"$(1)==[^"]+"' pyproject.toml | tr -d '"')

$(STAMP): pyproject.toml
	test -x $(PYTHON) || python3 -m venv $(VENV)
	$(PYTHON) -m pip install -q --upgrade pip setuptools wheel
	$(PYTHON) -m pip install -q $(call pin,torch) $(call pin,torchvision)
	$(PYTHON) -m pip install -q --no-build-isolation $(call pin,deepspeed)
	$(PYTHON) -m pip install -q -e '.[dev]'
	touch $@

# The infra tests run a real PostgreSQL under an MLflow server: Debian's package, installed when missing.
postgres:
	@compgen -G "/usr/lib/postgresql/*/bin/initdb" > /dev/null || { \
		SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
		$$SUDO apt-get update -q && $$SUDO apt-get install -y -q --no-install-recommends postgresql; }

.PHONY: help setup test test-fast demo lint postgres gpu-check
help:
	@echo "make demo  - run the main job (jobs/demo_cpu.yaml) on the embedded synthetic dataset"
	@echo "make test  - run the test suite"
	@echo "make test-fast - the tests without Ray, worker processes or servers (the edit-test loop)"
	@echo "make lint  - ruff"

setup: $(STAMP)

test: $(STAMP) postgres
	$(PYTHON) -m pytest $(PYTEST_ARGS)

# The edit-test loop: no Ray, no worker processes, no servers (the `slow` marker); CI runs `make test`.
test-fast: $(STAMP)
	$(PYTHON) -m pytest -m "not slow" $(PYTEST_ARGS)

demo: $(STAMP)
	$(PYTHON) -m pipeline.job jobs/demo_cpu.yaml

lint: $(STAMP)
	$(VENV)/bin/ruff check .

# On a CUDA machine, in under 10 minutes: kernel tests on the GPU, kernel benchmarks, a bf16 step of every
# backbone preset (plain and checkpointed), the Hugging Face comparison and compiled blocks; rows to
# kernels/benchmarks/results.jsonl. Exit 2 without one.
gpu-check: $(STAMP)
	$(PYTHON) benchmarks/gpu_check.py
