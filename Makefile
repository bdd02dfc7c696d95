# The README's commands. Each target sets up .venv itself (idempotent: re-installs only when
# pyproject.toml changes), so a fresh machine needs nothing but Python >= 3.11 and pip.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test test-fast bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed-run: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $@

$(VENV)/.installed-bench: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e ".[bench]"
	touch $@

demo: $(VENV)/.installed-run
	$(BIN)/scanlab demo

test: $(VENV)/.installed-test
	$(BIN)/ruff check src tests
	$(BIN)/ruff format --check src tests
	$(BIN)/mypy
	$(BIN)/python -m pytest

# The library's unit and property tests: no end-to-end or real-model runs.
test-fast: $(VENV)/.installed-test
	$(BIN)/ruff check src tests
	$(BIN)/python -m pytest -m "not slow"

bench: $(VENV)/.installed-bench
	$(BIN)/scanlab bench --out results/bench

clean:
	rm -rf $(VENV) results .pytest_cache .hypothesis .cache/jax
