# `make demo` and `make test` set up .venv on first use (scripts/setup.sh) and then run.
SHELL := /bin/bash
VENV_BIN := .venv/bin
# Tests and the demo read collections from ../shared/data when it is there; override freely.
export SBMOE_DATA_DIR ?= $(abspath $(wildcard ../shared/data))
export TOKENIZERS_PARALLELISM ?= false

# One test process per core (pytest-xdist), each test file in one of them: the session's Milvus
# server starts once, where tests/test_store_server.py runs. `make test PARALLEL=`: one process.
PARALLEL ?= -n logical --dist loadfile

.PHONY: setup demo test test-fast lint format docs bench gpu-check

setup:
	@bash scripts/setup.sh

demo: setup
	$(VENV_BIN)/sbmoe demo $(ARGS)

test: setup
	$(VENV_BIN)/ruff check src tests bench
	$(VENV_BIN)/python -m pytest -q -rs $(PARALLEL) $(ARGS)

test-fast: setup
	$(VENV_BIN)/python -m pytest -q -m "not integration" $(PARALLEL) $(ARGS)

lint: setup
	$(VENV_BIN)/ruff check src tests bench
	$(VENV_BIN)/ruff format --check src tests bench

format: setup
	$(VENV_BIN)/ruff format src tests bench
	$(VENV_BIN)/ruff check --fix src tests bench

# The documentation site (docs/, mkdocs.yml) -> site/; --strict fails on a broken link or a page
# outside the navigation. NO_MKDOCS_2_WARNING silences mkdocs-material's notice about MkDocs 2.
docs: setup
	NO_MKDOCS_2_WARNING=1 $(VENV_BIN)/mkdocs build --strict

# Benchmarks print ratios against the reference measured in the same run (bench/RESULTS.md).
bench: setup
	for script in encode search head_cost head_only grad_cache sweep ann serve query_side; do $(VENV_BIN)/python bench/bench_$$script.py || exit 1; done

gpu-check: setup
	$(VENV_BIN)/python bench/gpu_check.py
