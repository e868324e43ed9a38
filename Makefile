# Two commands do all set-up on a fresh clone:  `make demo`  and  `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
STAMP   = $(VENV)/.installed

.PHONY: venv demo test test-slow bench clean

# torch is installed first and pinned (2.13.0, CPU build) so no resolver can pull a CUDA build.
$(STAMP): pyproject.toml setup.py src/microscale/kernels/_mxkernels.c
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q --no-build-isolation -e '.[test,mcmc,experiments]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/microscale demo

test: $(STAMP)
	$(PY) -m pytest -q -m "not slow" -n 2

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

# Benchmarks run in their own venv (.venv-bench, self-gitignored) with torchao beside microscale.
# MICROXCALING=/path/to/microsoft/microxcaling checkout adds its column (never vendored here).
BENCH_VENV = .venv-bench
BENCH_PY   = $(BENCH_VENV)/bin/python
MICROXCALING ?=

$(BENCH_VENV)/.installed: pyproject.toml setup.py src/microscale/kernels/_mxkernels.c
	$(PYTHON) -m venv $(BENCH_VENV)
	echo '*' > $(BENCH_VENV)/.gitignore
	$(BENCH_PY) -m pip install -q --upgrade pip setuptools wheel
	$(BENCH_PY) -m pip install -q torch==2.13.0
	$(BENCH_PY) -m pip install -q torchao
	$(BENCH_PY) -m pip install -q --no-build-isolation -e .
	touch $@

bench: $(BENCH_VENV)/.installed
	$(BENCH_PY) benchmarks/quantize.py $(if $(MICROXCALING),--microxcaling $(MICROXCALING)) --memory

clean:
	rm -rf $(VENV) $(BENCH_VENV) build src/*.egg-info src/microscale/kernels/*.so
