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

.PHONY: setup demo test lint device-shared
setup: $(BIN)/.installed

demo: setup
	$(BIN)/omnidraft-fast demo

test: setup
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# The tokenizers a leased GPU machine needs (../shared does not travel there): run the suite with
# carry [".shared"] (benchmarks/gpu_suite.sh).
device-shared:
	mkdir -p .shared
	rm -rf .shared/tokenizers && cp -r ../shared/tokenizers .shared/tokenizers
