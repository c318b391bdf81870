# `make run` and `make test` do all set-up themselves on a fresh machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup run test lint typecheck bench dist clean

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

# The executable with its libraries beside it (dist/appliance/), one tarball of it, then a smoke
# test of the built binary (packaging/smoke.sh), again with no network but loopback.
DIST_TARBALL := dist/appliance-linux-$(shell uname -m).tar.gz

dist: setup
	$(BIN)/python -m pip install --quiet "pyinstaller>=6.10"
	$(BIN)/pyinstaller --noconfirm --clean --log-level WARN --distpath dist --workpath build/pyinstaller \
		packaging/appliance.spec
	tar -C dist -czf $(DIST_TARBALL) appliance
	bash packaging/smoke.sh dist/appliance/appliance
	unshare -n sh -c 'ip link set lo up && bash packaging/smoke.sh dist/appliance/appliance'

clean:
	rm -rf $(VENV) build dist *.egg-info
