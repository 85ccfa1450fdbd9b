# Every target installs what it needs into .venv first; `make install` is a no-op when .venv is current.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
BENCH_STAMP := $(VENV)/.installed-bench
ARGS ?=

.PHONY: install train test lint bench clean report

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

train: install
	$(PY) train.py $(ARGS)

test: install
	$(PY) -m pytest $(ARGS)

lint: install
	$(VENV)/bin/ruff check anomaly_lab tests experiments train.py eval.py predict.py

$(BENCH_STAMP): $(STAMP)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev,bench]'
	touch $(BENCH_STAMP)

bench: $(BENCH_STAMP)
	$(PY) experiments/benchmarks/run.py $(ARGS)
	$(PY) experiments/benchmarks/cache_bottle.py
	$(PY) experiments/benchmarks/patchcore_bottle.py $(ARGS)

# The comparison report of a sweep folder: RUN=logs/train/multiruns/<time> (default: the newest one);
# ARGS passes options, e.g. ARGS="report.wandb=true".
RUN ?= $(lastword $(sort $(wildcard logs/train/multiruns/*)))

report: install
	@test -n "$(RUN)" || { echo "no sweep folder in logs/train/multiruns: run python train.py -m ... first, or give RUN=<folder>"; exit 1; }
	$(PY) -m anomaly_lab.report $(RUN) $(ARGS)

# Removes what the Makefile built; never logs/ (your runs) or data/ (your datasets).
clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
