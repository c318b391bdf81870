# `make run` and `make test` do all set-up themselves on a fresh machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup run test lint typecheck bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

run: setup
	$(BIN)/appliance serve

lint: setup
	$(BIN)/ruff check appliance tests bench packaging
	$(BIN)/ruff format --check appliance tests bench packaging

typecheck: setup
	$(BIN)/mypy

test: lint typecheck
	$(BIN)/pytest

$(VENV)/.bench: $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[dev,bench]'
	touch $@

bench: $(VENV)/.bench
	$(BIN)/python bench/ingest.py
	$(BIN)/python bench/inference.py

clean:
	rm -rf $(VENV) build dist *.egg-info
