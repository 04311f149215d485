# fedpipe: `make demo` installs everything and trains on the bundled data;
# `make test` installs everything and runs the whole test suite.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
UV_VERSION := 0.13.9
TOOLS := .tools
UV := $(TOOLS)/bin/uv
VENV := .venv
PY := $(VENV)/bin/python
CONFIG ?= configs/digits_dp.py
OUTPUT_DIR ?=
PYTEST_ARGS ?=

.PHONY: install demo demo-silos test test-fast bench clean

$(UV):
	$(PYTHON) -m venv $(TOOLS)
	$(TOOLS)/bin/python -m pip install --quiet --disable-pip-version-check uv==$(UV_VERSION)

$(VENV)/.installed: $(UV) pyproject.toml uv.lock
	$(UV) sync --frozen --compile-bytecode --python $(PYTHON)
	@touch $@

install: $(VENV)/.installed

demo: install
	$(PY) -m pipelines.make_data --config=$(CONFIG)
	$(PY) -m pipelines.preprocess --config=$(CONFIG)
	$(PY) -m pipelines.train --config=$(CONFIG) $(if $(OUTPUT_DIR),--output_dir=$(OUTPUT_DIR))

test: install
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: install
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

bench: install
	$(PY) -m benchmarks.run_all

clean:
	rm -rf $(VENV) $(TOOLS) data runs

# Three silo servers on loopback (mutual TLS), then training across them.
demo-silos: install
	$(PY) -m pipelines.make_data --config=$(CONFIG)
	$(PY) -m pipelines.cross_silo_demo --config=$(CONFIG)
