# fedpipe: `make demo` installs everything and trains on the bundled data;
# `make test` installs everything and runs the whole test suite.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
UV_VERSION := 0.13.9
TOOLS := .tools
UV := $(TOOLS)/bin/uv
VENV := .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
CONFIG ?= configs/digits_dp.py
OUTPUT_DIR ?=
PYTEST_ARGS ?=
# The whole suite runs its test files on this many processes (pytest-xdist):
# most tests wait on subprocesses, so two share two cores well.
TEST_WORKERS ?= 2

.PHONY: install lint demo demo-silos test test-fast bench clean

$(UV):
	$(PYTHON) -m venv $(TOOLS)
	$(TOOLS)/bin/python -m pip install --quiet --disable-pip-version-check uv==$(UV_VERSION)

$(VENV)/.installed: $(UV) pyproject.toml uv.lock
	$(UV) sync --frozen --compile-bytecode --python $(PYTHON)
	@touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/fedpipe-make-data --config=$(CONFIG)
	$(BIN)/fedpipe-preprocess --config=$(CONFIG)
	$(BIN)/fedpipe-train --config=$(CONFIG) $(if $(OUTPUT_DIR),--output_dir=$(OUTPUT_DIR))

# The code's shape: ruff (lint and format) and the layer contract (import-linter).
lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

test: lint
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder $(PYTEST_ARGS)

test-fast: lint
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

bench: install
	$(PY) -m benchmarks.run_all

clean:
	rm -rf $(VENV) $(TOOLS) data runs

# Three silo servers on loopback (mutual TLS), then training across them.
demo-silos: install
	$(BIN)/fedpipe-make-data --config=$(CONFIG)
	$(BIN)/fedpipe-demo-silos --config=$(CONFIG)
