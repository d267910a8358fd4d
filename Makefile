# Set up, test and lint balloond. Everything runs from the project's own virtualenv.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup test lint clean

setup: $(STAMP)

# Reinstall (and so rebuild the cffi extension) whenever the packaging or the C changes.
$(STAMP): pyproject.toml setup.py $(wildcard native/*.c native/*.h native/*.py)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -e '.[dev]'
	touch $@

test: $(STAMP)
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy balloond

clean:
	rm -rf $(VENV) build dist *.egg-info balloond/_native.c balloond/_native*.so \
		.pytest_cache .mypy_cache .ruff_cache .hypothesis
