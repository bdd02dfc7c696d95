# The README's commands. Each target sets up .venv itself (idempotent: re-installs only when
# pyproject.toml changes), so a fresh machine needs nothing but Python >= 3.11 and pip.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test test-e2e test-fast bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed-run: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $@

$(VENV)/.installed-e2e: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e ".[test,e2e]"
	touch $@

$(VENV)/.installed-bench: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e ".[bench]"
	touch $@

demo: $(VENV)/.installed-run
	$(BIN)/scanlab demo

# The default tier's programs are tiny, so compiling them is most of its time: XLA's backend
# compiles them without LLVM's optimization passes (the same programs and assertions,
# compiled faster). The end-to-end tier runs real models, where run time counts: it keeps them.
FAST_COMPILE := XLA_FLAGS="--xla_backend_optimization_level=0 $$XLA_FLAGS"

# Lint, types, and every test but the end-to-end ones (docs/testing.md says what each tier holds).
test: $(VENV)/.installed-test
	$(BIN)/ruff check src tests
	$(BIN)/ruff format --check src tests
	$(BIN)/mypy
	$(FAST_COMPILE) $(BIN)/python -m pytest -m "not e2e"

# The end-to-end tier: the tour, the docs' blocks, the README's CLI, several processes, the real
# fine-tunes against transformers and PEFT, files made by llama.cpp's converter against llama.cpp,
# a quick benchmark run. CI runs it after `make test`.
test-e2e: $(VENV)/.installed-e2e
	$(BIN)/python -m pytest -m e2e

# The unit and property tests alone, offline (pip may not fetch a model file): no real model.
test-fast: $(VENV)/.installed-test
	$(BIN)/ruff check src tests
	PIP_NO_INDEX=1 $(FAST_COMPILE) $(BIN)/python -m pytest -m "not slow and not e2e" --no-oracles

bench: $(VENV)/.installed-bench
	$(BIN)/scanlab bench --out results/bench

clean:
	rm -rf $(VENV) results .pytest_cache .hypothesis .cache/jax
