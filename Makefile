# Two commands on a fresh machine:
#   make run    set up .venv (pinned), then train the default recipe end to end
#   make test   set up .venv with dev extras, then run every test
# Everyday: make test-fast (the unit tier, tests/unit), make lint (ruff check + format check, mypy on lora_core/)
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
RECIPE ?= recipes/socratic-tutor.yaml

.PHONY: setup setup-dev run test test-fast lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade "pip>=24"

# Stamps are keyed on the files that define the environment.
$(VENV)/.stamp-base: pyproject.toml constraints.txt | $(BIN)/python
	$(BIN)/pip install --quiet -c constraints.txt -e .
	touch $@

$(VENV)/.stamp-dev: pyproject.toml constraints.txt | $(BIN)/python
	$(BIN)/pip install --quiet -c constraints.txt -e ".[dev]"
	touch $@ $(VENV)/.stamp-base

setup: $(VENV)/.stamp-base
setup-dev: $(VENV)/.stamp-dev

run: setup
	$(BIN)/lora-flow run $(RECIPE) $(ARGS)

test: setup-dev
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: setup-dev
	$(BIN)/python -m pytest tests/unit $(PYTEST_ARGS)

lint: setup-dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

clean:
	rm -rf $(VENV) outputs .pytest_cache
