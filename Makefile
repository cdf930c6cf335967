# The two commands of the README, and the checks CI runs. Nothing here needs Docker.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: demo test lint typecheck schemas pytest bench install clean

# A fresh virtual environment with the project and its dev tools, rebuilt when pyproject changes.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

# The main job: a day of cross-province settlement on the embedded broker.
demo: $(STAMP)
	$(BIN)/xsettle demo $(ARGS)

# Everything CI checks: lint, types, the schema evolution gate, then the test suite on the
# embedded broker.
test: lint typecheck schemas pytest

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

# The schema evolution gate: every schema against all its published versions (FULL_TRANSITIVE).
schemas: $(STAMP)
	$(BIN)/xsettle schemas check

# Three workers, a test file each at a time (a module shares one broker): most of a test's time
# is waiting on the broker, so the 2 cores overlap three files' waits.
PYTEST_WORKERS ?= 3

pytest: $(STAMP)
	sh scripts/install-browser.sh
	$(BIN)/pytest -n $(PYTEST_WORKERS) --dist loadfile $(ARGS)

bench: $(STAMP)  # xsettle bench: a table and reports/bench.json
	$(BIN)/xsettle bench $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache build dist *.egg-info
