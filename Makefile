# Quick start: `make demo` and `make test` on a fresh machine with Python 3.11+ and make.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv demo test test-fast test-slow lint bench clean

venv: $(STAMP)

# Rebuilt whenever pyproject.toml changes; everything the project needs is declared there.
# setup.py builds the optional CPU kernels (etcjax/csrc) in place, so their sources count too.
$(STAMP): pyproject.toml setup.py $(wildcard etcjax/csrc/*.cc etcjax/csrc/*.h)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m etcjax.demo --out demo_out

# Everything CI runs: lint, the fast suite, then the slow suite.
test: $(STAMP)
	$(MAKE) lint
	$(MAKE) test-fast
	$(MAKE) test-slow

test-fast: $(STAMP)
	$(PY) -m pytest -q -n 2

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

lint: $(STAMP)
	$(VENV)/bin/ruff check etcjax tests benchmarks configs

# Benchmarks (figures in the README). PyTorch is only needed for the side-by-side model
# step; TORCH names the wheel (2.13.0 is a CPU build on the development machines).
TORCH ?= torch==2.13.0
bench: $(STAMP)
	$(PY) -m pip install --quiet '$(TORCH)'
	$(PY) benchmarks/bench_etc.py
	$(PY) benchmarks/bench_models.py
	$(PY) benchmarks/bench_train.py

clean:
	rm -rf $(VENV) demo_out .pytest_cache
