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

# The GPU check of the lent H200 (benchmarks/gpu_check.sh). gpu-wheels fetches the wheels
# its Python 3.12 lacks (what the check imports beyond that machine's packages) into .whl/,
# which git ignores and the device tool carries; gpu-check-rehearsal runs the same script
# on this CPU with a Python 3.12 env (GPU_CHECK_PYTHON), without what needs a GPU or torch.
GPU_WHEELS := ml-collections==1.1.0
GPU_CHECK_PYTHON ?= python3.12

.PHONY: gpu-wheels gpu-check-rehearsal

gpu-wheels: | $(PY)
	rm -rf .whl
	$(PY) -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
	  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
	  --platform manylinux2014_x86_64 -d .whl $(GPU_WHEELS)
	du -sh .whl

gpu-check-rehearsal: gpu-wheels
	PYTHON=$(GPU_CHECK_PYTHON) bash benchmarks/gpu_check.sh --rehearse
