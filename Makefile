# Set up and run everything on a fresh machine: `make demo`, `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# pytest-xdist workers; the parity suite is CPU-bound and the CI machine has 2 cores.
TEST_WORKERS ?= 2

.PHONY: install test demo clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip

# torch is installed first and pinned: any other spec pulls the CUDA build.
$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install "torch==2.13.0"
	$(PY) -m pip install -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -n $(TEST_WORKERS) tests

demo: $(STAMP)
	$(PY) -m deformable_detr_jax.demo

clean:
	rm -rf $(VENV) .pytest_cache
