# Set up and run everything on a fresh machine: `make demo`, `make test`.
#
# Two environments, the two lanes CI tests:
#   .venv         Python 3.11 ($(PYTHON)): jax 0.10.2, torch 2.13.0 CPU, transformers; the
#                 whole suite. `make demo` puts only the runtime dependencies here.
#   .venv-newest  Python 3.12 (.ci/find_python): the newest jax, jaxlib, flax, optax,
#                 orbax-checkpoint and grain the index serves; every test not marked torch.
PYTHON ?= python3
PYTHON_NEWEST ?= $(shell .ci/find_python 3.12)
VENV ?= .venv
VENV_NEWEST ?= .venv-newest
PY := $(VENV)/bin/python
PY_NEWEST := $(VENV_NEWEST)/bin/python
# pytest-xdist workers; the parity suite is CPU-bound and the CI machine has 2 cores.
TEST_WORKERS ?= 2
# --durations: the 20 slowest tests of each lane in the log, to keep CI well inside its limit.
PYTEST_ARGS ?= --durations=20
# The ONNX converter, installed without its dependencies (see pyproject's `export` extra).
JAX2ONNX ?= jax2onnx==0.17.1

.PHONY: install install-test install-newest lint test test-main test-newest demo clean clean-newest

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip

$(PY_NEWEST):
	@test -n "$(PYTHON_NEWEST)" || { echo "error: no Python 3.12 found (see .ci/find_python)" >&2; exit 1; }
	$(PYTHON_NEWEST) -m venv $(VENV_NEWEST)
	$(PY_NEWEST) -m pip install --upgrade pip

# The runtime dependencies only: what `make demo` needs.
$(VENV)/.installed-runtime: pyproject.toml | $(PY)
	$(PY) -m pip install -e .
	touch $@

# torch is installed first and pinned: any other spec pulls the CUDA build.
$(VENV)/.installed-test: pyproject.toml | $(PY)
	$(PY) -m pip install "torch==2.13.0"
	$(PY) -m pip install -e ".[test,torch,export,datasets]"
	$(PY) -m pip install --no-deps "$(JAX2ONNX)"
	touch $@ $(VENV)/.installed-runtime

# No torch here; fails unless the index's newest releases were installed.
$(VENV_NEWEST)/.installed-test: pyproject.toml | $(PY_NEWEST)
	$(PY_NEWEST) -m pip install --upgrade --upgrade-strategy eager -e ".[test,export,datasets]"
	$(PY_NEWEST) -m pip install --no-deps "$(JAX2ONNX)"
	$(PY_NEWEST) .ci/check_newest.py
	touch $@

install: $(VENV)/.installed-runtime
install-test: $(VENV)/.installed-test
install-newest: $(VENV_NEWEST)/.installed-test

# Lint and format first (seconds), then both lanes; each lane runs even if the other fails,
# and `make test` fails if any part does.
test: $(VENV)/.installed-test $(VENV_NEWEST)/.installed-test
	@status=0; \
	$(MAKE) --no-print-directory lint || status=1; \
	$(MAKE) --no-print-directory test-main || status=1; \
	$(MAKE) --no-print-directory test-newest || status=1; \
	if [ $$status -ne 0 ]; then echo "make test: lint or a lane failed (see above)" >&2; fi; \
	exit $$status

lint: $(VENV)/.installed-test
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

test-main: $(VENV)/.installed-test
	@echo "== lane 1: Python 3.11, jax 0.10.2, torch: the whole suite =="
	@$(PY) .ci/versions.py
	$(PY) -m pytest -n $(TEST_WORKERS) $(PYTEST_ARGS) tests

test-newest: $(VENV_NEWEST)/.installed-test
	@echo "== lane 2: Python 3.12, newest jax: tests not marked torch =="
	@$(PY_NEWEST) .ci/versions.py
	$(PY_NEWEST) -m pytest -n $(TEST_WORKERS) -m "not torch" $(PYTEST_ARGS) tests

demo: $(VENV)/.installed-runtime
	$(PY) -m deformable_detr_jax.demo

clean:
	rm -rf $(VENV) $(VENV_NEWEST) .pytest_cache

clean-newest:
	rm -rf $(VENV_NEWEST)

# The GPU check of the lent H200 (benchmarks/gpu_check.sh). gpu-wheels fetches the wheels
# its Python 3.12 lacks (what the check imports beyond that machine's packages) into .whl/,
# which git ignores and the device tool carries; gpu-check-rehearsal runs the same script
# on this CPU with a Python 3.12 env (GPU_CHECK_PYTHON), without what needs a GPU or torch.
GPU_WHEELS := ml-collections==1.1.0
GPU_CHECK_PYTHON ?= $(PY_NEWEST)

.PHONY: gpu-wheels gpu-check-rehearsal

gpu-wheels: | $(PY)
	rm -rf .whl
	$(PY) -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
	  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
	  --platform manylinux2014_x86_64 -d .whl $(GPU_WHEELS)
	$(PY) -m pip download --no-deps --only-binary=:all: -d .whl/fallback "flax==0.12.8"
	du -sh .whl

gpu-check-rehearsal: gpu-wheels $(VENV_NEWEST)/.installed-test
	PYTHON=$(GPU_CHECK_PYTHON) bash benchmarks/gpu_check.sh --rehearse
