# The README's commands. Everything runs inside .venv, created on first use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# torch is installed first, pinned, so that `torch>=2.4` in pyproject.toml is already met.
# On the project's build machines this pin resolves to a local CPU wheel; elsewhere on Linux
# it is PyPI's CUDA build (see DEVELOPERS.md).
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.installed-stamp

.PHONY: install demo serve test test-unit lint ui clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

# The whole supervised pipeline on the bundled digits, then one real HTTP prediction.
demo: install
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc repro
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dlpipe serve --demo

# Serve the registered model until Ctrl-C (after `make demo`).
serve: install
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dlpipe serve

test: install lint
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test-unit: install
	$(BIN)/python -m pytest tests/unit

# The MLflow dashboard on http://127.0.0.1:5000
ui: install
	$(BIN)/dlpipe ui

clean:
	rm -rf ray_results .pytest_cache
