# Two commands do all set-up: `make run` (the default pipeline) and `make test` (the test suite);
# `make test-fast` is the quick loop: the tests that start no flow, server or subprocess CLI.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
CONFIG ?= pipeline.yaml

.PHONY: setup run test test-fast lint format check clean

setup: $(VENV)/.installed

# torch comes first and pinned (constraints.txt): any looser spec would pull a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt torch==2.13.0
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[test]"
	$(BIN)/python -c "import torch, sys; v = torch.__version__; sys.exit(0 if v.startswith('2.13.0') else f'pip replaced torch: {v}')"
	touch $@

run: setup
	$(BIN)/mixtune run $(CONFIG)

check: setup
	$(BIN)/mixtune check $(CONFIG)

# pytest-xdist workers of one thread each, a module per worker: a module's fixture (a trained stage, a server) is
# built once; modules are queued longest first (tests/conftest.py), not by test count. Two on two cores (three
# measured slower: 12 min 24 s against 11 min 15 s, 2026-12-08, fresh clones). TEST_WORKERS=0: one process.
TEST_WORKERS ?= 2

test: setup
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

test-fast: setup
	$(BIN)/python -m pytest -m "not e2e and not integration"

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: setup
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf runs .prefect .pytest_cache
