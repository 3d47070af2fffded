# Ferry: one command to run it (make up), one to test it (make test).
# `make setup` is idempotent: a virtual environment in .venv with the CPU build of torch
# pinned where there is no GPU (an unpinned torch pulls gigabytes of CUDA packages).

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_CPU := torch==2.13.0
HAS_GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo 1)
COMMA := ,
EXTRAS := dev$(if $(HAS_GPU),$(COMMA)gpu,)
STAMP := $(VENV)/.ferry-setup
PYTEST_ARGS ?=

.PHONY: setup up test test-fast lint gpu-wheels clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
ifeq ($(HAS_GPU),)
	$(BIN)/python -m pip install -q $(TORCH_CPU)
endif
	$(BIN)/python -m pip install -q -e '.[$(EXTRAS)]'
	touch $@

up: setup
	$(BIN)/ferry up $(ARGS)

test: setup
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

test-fast: setup
	$(BIN)/python -m pytest -q -m "not e2e and not slow" $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check .

# Wheels the GPU machine lacks (it has no network): pyzmq for its Python 3.12.
gpu-wheels:
	mkdir -p .whl
	$(PYTHON) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
	  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
	  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
	  pyzmq==27.3.0 structlog==26.1.0
	ls .whl

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
