# metalearn: `make help` lists the targets.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export METALEARN_DATA ?= $(abspath ../shared/data)

.PHONY: help install reference test test-reference faults lint format bench reproduce clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  make %-10s %s\n", $$1, $$2}'

install:  ## create .venv and install metalearn editable with its dev and mujoco extras
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -e '.[dev,mujoco]'

reference:  ## install learn2learn, the reference for `metalearn bench` and equivalence tests
	scripts/install_learn2learn.sh $(VENV)

test:  ## run the test suite (about 10 to 12 minutes on 2 cores; real Omniglot from $$METALEARN_DATA)
	$(BIN)/python -m pytest -n auto --maxprocesses=4

test-reference:  ## only the tests against reference code (after `make reference`)
	$(BIN)/python -m pytest -m reference

faults:  ## only tests/faults: kills, damaged files, full disks, NaNs, outages, bad configs
	$(BIN)/python -m pytest tests/faults

lint:  ## ruff lint and format check
	$(BIN)/ruff check metalearn tests scripts
	$(BIN)/ruff format --check metalearn tests scripts

format:  ## apply ruff's formatting and safe fixes
	$(BIN)/ruff check --fix metalearn tests scripts
	$(BIN)/ruff format metalearn tests scripts

bench:  ## time meta-training against learn2learn and reference code (needs `make reference`)
	$(BIN)/metalearn bench

TABLE ?=
BUDGET ?= 1
SEEDS ?= 3
reproduce:  ## TABLE=<name> [BUDGET=F SEEDS=N]: a paper table into results/; no TABLE: the README runs (2.5 h)
ifneq ($(TABLE),)
	$(BIN)/metalearn reproduce $(TABLE) --budget $(BUDGET) --seeds $(SEEDS)
else
	PATH=$(abspath $(BIN)):$$PATH scripts/readme_runs.sh
	$(BIN)/python scripts/results_table.py outputs/readme
	METALEARN=$(abspath $(BIN))/metalearn scripts/bandit_runs.sh
	$(BIN)/python scripts/bandit_table.py outputs/readme_rl
endif

clean:  ## remove caches (not outputs/)
	rm -rf .pytest_cache .ruff_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
