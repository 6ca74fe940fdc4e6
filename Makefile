# Set-up and entry points. `make demo` and `make test` each build the virtual environment first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The CPU build of torch: a bare `torch` requirement would pull a multi-GB CUDA build on a CPU machine.
TORCH_SPEC ?= torch==2.13.0

RUFF := $(BIN)/ruff

.PHONY: setup demo example test bench quality style

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml .ci/constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -c .ci/constraints.txt -e ".[test,quality]"
	touch $@

demo: setup
	$(BIN)/longlora-hf demo

example: setup
	$(BIN)/longlora-hf example

test: setup
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -n 2 --dist worksteal --durations=25 tests

bench: setup
	$(BIN)/python benchmarks/s2_attention.py

# Lint and format check, then the repository's policy checks (utils/check_repo.py: safe loading, the import
# layering, each command's run function beside its parser, no time figures in help texts or docstrings).
quality: setup
	$(RUFF) check .
	$(RUFF) format --check .
	HF_HUB_OFFLINE=1 $(BIN)/python utils/check_repo.py

# Fix what ruff can fix and format the tree.
style: setup
	$(RUFF) check --fix .
	$(RUFF) format .
