# `make demo` and `make test` create .venv when missing and install the project into it.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.tfemb-installed
PYTEST_WORKERS ?= 2
export TF_CPP_MIN_LOG_LEVEL ?= 2

.PHONY: demo test test-keras3 test-keras2 bench install clean

$(STAMP): setup.py requirements.txt requirements-test.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

## The main job: every embedding scheme vs the fixed baseline on the embedded synthetic dataset.
demo: $(STAMP)
	$(BIN)/tfemb compare --out outputs/compare

## The whole suite under Keras 3 (default) and again under Keras 2 (tf-keras).
test: $(STAMP)
	$(MAKE) --no-print-directory test-keras3
	$(MAKE) --no-print-directory test-keras2

test-keras3: $(STAMP)
	@echo "== tests under Keras 3 =="
	$(BIN)/python -m pytest -n $(PYTEST_WORKERS) -q --durations=10 tests

test-keras2: $(STAMP)
	@echo "== tests under Keras 2 (TF_USE_LEGACY_KERAS=1) =="
	TF_USE_LEGACY_KERAS=1 $(BIN)/python -m pytest -n $(PYTEST_WORKERS) -q --durations=10 tests

## Benchmarks (speed, size, quality; JSON + Markdown in benchmarks/results/).
bench: $(STAMP)
	$(BIN)/python -m pip install --quiet -e ".[bench]"
	$(BIN)/python benchmarks/run_all.py

clean:
	rm -rf outputs runs .pytest_cache
