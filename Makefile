# Set-up and entry points. `make demo` and `make test` each build the virtual environment first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The CPU build of torch: a bare `torch` requirement would pull a multi-GB CUDA build on a CPU machine.
TORCH_SPEC ?= torch==2.13.0

RUFF := $(BIN)/ruff
# Repository policy checks that still live in the test suite (no time figures in help texts or docstrings, each
# command's run function beside its parser, import layering, no unsafe loading): run here by node id too.
POLICY_TESTS := \
	tests/test_cli.py::test_no_help_or_docstring_states_a_time_the_readme_measures \
	tests/test_cli.py::test_every_command_comes_from_the_registry_with_its_run_function_beside_its_parser \
	tests/test_layering.py \
	tests/test_security.py::test_every_torch_load_is_weights_only \
	tests/test_security.py::test_trust_remote_code_is_never_turned_on_and_pickle_is_never_called

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
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -n 2 tests

bench: setup
	$(BIN)/python benchmarks/s2_attention.py

# Lint and format check, then the policy checks.
quality: setup
	$(RUFF) check .
	$(RUFF) format --check .
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q $(POLICY_TESTS)

# Fix what ruff can fix and format the tree.
style: setup
	$(RUFF) check --fix .
	$(RUFF) format .
