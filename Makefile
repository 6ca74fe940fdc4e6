# Set-up and entry points. `make demo` and `make test` each build the virtual environment first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The CPU build of torch: a bare `torch` requirement would pull a multi-GB CUDA build on a CPU machine.
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup demo example test bench

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $@

demo: setup
	$(BIN)/longlora-hf demo

example: setup
	$(BIN)/longlora-hf example

test: setup
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -n 2 tests

bench: setup
	$(BIN)/python benchmarks/s2_attention.py
