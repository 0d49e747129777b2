# Two commands do all the set-up on a fresh machine:
#   make demo   - create .venv, install, run the paper's comparison on embedded data
#   make test   - create (or reuse) .venv, install, run the whole test suite
#   make check  - the fast tier of the tests, for the edit loop (no Ray, no Flower
#                 deployments, no benchmarks, golden reruns or other slow tests)
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# torch is pinned through constraints.txt: only torch 2.13.0 installs from the
# local CPU wheel; any other version would pull several GB of CUDA packages.
PIP_INSTALL := $(BIN)/python -m pip install --quiet --constraint constraints.txt

.PHONY: demo test check bench lint typecheck clean clean-cache

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(PIP_INSTALL) torch==2.13.0
	$(PIP_INSTALL) -e ".[dev,flower]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/adaquantfl compare configs/mnist1d-cnn.toml --out results/demo --overwrite

test: $(STAMP)
	$(BIN)/python -m pytest

# The markers are declared in pyproject.toml.
check: $(STAMP)
	$(BIN)/python -m pytest -m "not slow and not ray and not deployment"

bench: $(STAMP)
	$(BIN)/python -m benchmarks

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks examples tools
	$(BIN)/mypy

clean: clean-cache
	rm -rf $(VENV) results .pytest_cache .mypy_cache .ruff_cache

# numba's on-disk kernel caches (see src/adaquantfl/compression/_kernels/fused.py on when to drop them)
clean-cache:
	find src -name '*.nbi' -delete -o -name '*.nbc' -delete
