# Ferry: one command to run it (make up), one to test it (make test).
# `make setup` is idempotent: a virtual environment in .venv with exactly the versions of
# the lock file (requirements/cpu.lock without a GPU, requirements/gpu.lock with one),
# then Ferry itself, editable, on top. `make lock` refreshes the lock files on purpose.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
HAS_GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo 1)
LOCK := requirements/$(if $(HAS_GPU),gpu,cpu).lock
# The CPU build of torch (torch==X+cpu) is on PyTorch's index, not PyPI. pip tries the
# indexes it is configured with first (a mirror, a wheel folder) and this one only if
# they lack it.
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
TORCH_CPU := $(shell sed -n 's/^\(torch==[^ ]*\).*/\1/p' requirements/cpu.lock)
STAMP := $(VENV)/.ferry-setup
# A third-party benchmark client (aiperf) in a virtual environment of its own, from
# requirements/interop.lock: tests/e2e/test_interop_aiperf.py runs it against a cluster.
# Never in .venv: its dependencies pin versions that conflict with Ferry's lock.
INTEROP_VENV ?= .venv-interop
INTEROP_STAMP := $(INTEROP_VENV)/.ferry-interop
PYTEST_ARGS ?=

.PHONY: setup interop up test test-fast lint lock gpu-wheels clean

setup: $(STAMP)

$(STAMP): pyproject.toml $(LOCK) Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
ifeq ($(HAS_GPU),)
	$(BIN)/python -m pip install -q --no-deps $(TORCH_CPU) 2>/dev/null \
	  || $(BIN)/python -m pip install -q --no-deps --extra-index-url $(TORCH_CPU_INDEX) $(TORCH_CPU)
endif
	$(BIN)/python -m pip install -q -r $(LOCK)
	$(BIN)/python -m pip install -q --no-deps --no-build-isolation -e .
	touch $@

interop: $(INTEROP_STAMP)

$(INTEROP_STAMP): requirements/interop.lock
	test -x $(INTEROP_VENV)/bin/python || $(PYTHON) -m venv $(INTEROP_VENV)
	$(INTEROP_VENV)/bin/python -m pip install -q -r requirements/interop.lock
	touch $@

up: setup
	$(BIN)/ferry up $(ARGS)

test: setup interop
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

test-fast: setup
	$(BIN)/python -m pytest -q -m "not e2e and not slow" $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check .

# Re-resolve the lock files from pyproject.toml and requirements/*.in (newest versions
# that satisfy them), for Linux x86_64. uv does not read pip's configuration: pass a wheel
# folder or mirror with LOCK_ARGS (e.g. LOCK_ARGS="--find-links /opt/wheels"), and
# TORCH_CPU_INDEX= (empty) where PyTorch's index is unreachable but the folder has torch.
LOCK_ARGS ?=
UV_COMPILE = $(BIN)/uv pip compile -q --python-platform x86_64-manylinux_2_28 $(LOCK_ARGS)
lock: setup
	$(UV_COMPILE) --python-version 3.11 --extra dev --extra bench \
	  $(if $(TORCH_CPU_INDEX),--extra-index-url $(TORCH_CPU_INDEX) --index-strategy unsafe-best-match,) \
	  -o requirements/cpu.lock pyproject.toml requirements/cpu.in
	$(UV_COMPILE) --python-version 3.12 --extra gpu --extra dev --extra bench \
	  -o requirements/gpu.lock pyproject.toml requirements/gpu.in
	$(UV_COMPILE) --python-version 3.11 -o requirements/interop.lock requirements/interop.in
	git diff --stat requirements/

# Wheels the GPU machine lacks (it has no network): pyzmq for its Python 3.12.
gpu-wheels:
	mkdir -p .whl
	$(PYTHON) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
	  --implementation cp --platform manylinux_2_31_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
	  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
	  $$(grep -E '^(pyzmq|structlog|llguidance)==' requirements/gpu.lock)
	ls .whl

clean:
	rm -rf $(VENV) $(INTEROP_VENV) .pytest_cache .ruff_cache *.egg-info
