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

# The demo: builds the kit when missing, boots a guest on balloond, plots into demo-out/.
# matplotlib (the "demo" extra) is only for the PNG; without it the demo still runs.
.PHONY: demo
DEMO_STAMP := $(VENV)/.demo-installed

$(DEMO_STAMP): $(STAMP)
	$(BIN)/python -m pip install -q -e '.[dev,demo]' && touch $@ \
		|| echo "matplotlib could not be installed: the demo will write no PNG"

demo: $(DEMO_STAMP)
	$(BIN)/python -m kit.demo

# A coverage-guided fuzzing campaign (atheris) over the wire decoder, the protocol engine
# and the ring walker: docs/fuzzing.md. Not part of the tests.
.PHONY: fuzz
FUZZ_MINUTES ?= 30
fuzz: $(STAMP)
	$(BIN)/python -m pip install -q atheris
	$(BIN)/python -m fuzz.campaign --minutes $(FUZZ_MINUTES)

# The benchmark suite (bench/): writes docs/PERFORMANCE.md and its plots under
# docs/performance/. Not a test; about 15 minutes (BENCH_REPEATS=N for more repeats).
# matplotlib and py-spy come with the "bench" extra. The real-guest part builds the kit
# when it is missing (docs/kit.md).
.PHONY: bench
BENCH_STAMP := $(VENV)/.bench-installed

$(BENCH_STAMP): $(STAMP)
	$(BIN)/python -m pip install -q -e '.[dev,bench]' && touch $@

bench: $(BENCH_STAMP)
	$(BIN)/python -m bench
