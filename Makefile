# The two commands of the README. Each sets up its own virtual environment on first use.
#   make run    run the analysis pipeline on the embedded default model (results/ ...)
#   make test   run the test suite (fast tests; `make test-slow` adds the slow ones)
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# test processes (pytest-xdist); one torch thread each. JOBS=1 runs the suite in one process
JOBS ?= 2
XDIST := $(if $(filter 1,$(JOBS)),,-n $(JOBS) --dist loadfile)

.PHONY: run test test-slow bench setup

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

run: $(STAMP)
	$(PY) mamba_mechanistic_analysis.py $(ARGS)

test: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) -m pytest -q $(XDIST) $(ARGS)

test-slow: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) -m pytest -q $(XDIST) -m "slow or not slow" $(ARGS)

bench: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) bench/bench_model.py $(ARGS)
