# The README's commands. Everything runs inside .venv, created on first use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# torch is installed first, pinned, so that `torch>=2.4` in pyproject.toml is already met.
# On the project's build machines this pin resolves to a local CPU wheel; elsewhere on Linux
# it is PyPI's CUDA build (see DEVELOPERS.md).
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.installed-stamp

.PHONY: install demo serve test test-deps test-unit lint ui bench bench-deps chaos fuzz gpu-check clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { echo "dlpipe needs Python 3.11 or newer; $(PYTHON) is $$($(PYTHON) --version 2>&1). Run: make PYTHON=python3.11 ..." >&2; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

# The whole pipeline on the bundled data, with real HTTP predictions. The classifier's chain
# runs first (`dvc repro export`, a target of the same DAG: nothing runs twice), so its first
# answer comes within about two minutes of a fresh clone; then every other stage, and an
# answer from each served model. `dlpipe run` is `dvc repro` with the stages joining one
# local Ray instance instead of each starting its own.
demo: install
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dlpipe run export
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dlpipe serve --demo
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dlpipe run
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dlpipe serve --demo

# Serve the registered model until Ctrl-C (after `make demo`).
serve: install
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dlpipe serve

# The unit tests start no Ray, so they share the CPUs between two processes; everything
# else shares one local Ray cluster and runs in one.
test: install lint test-deps
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest tests/unit -n 2
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest --ignore=tests/unit

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# Debian packages the tests run: PostgreSQL under the team MLflow server
# (tests/cluster/test_team_tracking.py), and chromium with its chromedriver for the browser
# tests of the MLflow dashboard and the pipeline report (no browser download at run time).
# Installed when this runs as root with apt (CI).
TEST_DEBS := postgresql chromium chromium-driver
test-deps:
	@if ls -d /usr/lib/postgresql/*/bin >/dev/null 2>&1 && command -v chromium >/dev/null \
		&& command -v chromedriver >/dev/null; then :; \
	elif command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
			apt-get install -y -qq --no-install-recommends $(TEST_DEBS) >/dev/null; \
	else echo "make test: missing Debian packages (the team tracking and browser tests run them): apt-get install $(TEST_DEBS)" >&2; exit 1; fi

test-unit: install
	$(BIN)/python -m pytest tests/unit

# Every benchmark in benchmarks/, one after the other (over an hour on 2 CPUs), each
# writing benchmarks/results/<name>.json (and a .md table for most). The pipeline runs first:
# the benchmarks time its outputs. `make bench BENCH_DEMO=` leaves out the cold and warm
# `make demo` of the pipeline-overhead benchmark (the cold one trains every stage).
BENCH_DEMO ?= --demo
bench: install bench-deps
	@command -v wrk >/dev/null || { echo "make bench: wrk is missing; the serving benchmark needs it: apt-get install wrk (macOS: brew install wrk)" >&2; exit 1; }
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc repro
	$(BIN)/python -m benchmarks.training_throughput
	$(BIN)/python -m benchmarks.inference
	$(BIN)/python -m benchmarks.pipeline_overhead $(BENCH_DEMO)
	$(BIN)/python -m benchmarks.augmentation
	$(BIN)/python -m benchmarks.pseudolabel_seeds
	$(BIN)/python -m benchmarks.shapes_folder
	$(BIN)/python -m benchmarks.fixmatch_scale
	$(BIN)/python -m benchmarks.tune_asha
	$(BIN)/python -m benchmarks.vanishing_gradients
	$(BIN)/python -m benchmarks.batching_overhead
	$(BIN)/python -m benchmarks.request_path
	$(BIN)/python -m benchmarks.serving_throughput
	$(BIN)/python -m benchmarks.lifecycle

# Faults injected into the real components (benchmarks/chaos.py: killed stage drivers,
# altered data, a stage killed mid-write, a full disk), each measured against its target,
# written to benchmarks/results/chaos.json and chaos.md. Root mounts the small tmpfs of
# the full-disk fault. tests/integration/test_chaos.py runs the quick ones in `make test`.
chaos: install
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m benchmarks.chaos

# Every endpoint of `dlpipe serve` (on the exported models: after `make demo`) fuzzed from
# its own OpenAPI document (benchmarks/fuzz.py: schemathesis, 1,000 cases per endpoint and
# phase, plus hostile images and texts), written to benchmarks/results/fuzz.json and
# fuzz.md. tests/integration/test_serve_app.py runs a small subset in `make test`.
fuzz: install
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m benchmarks.fuzz

# The benchmarks' Debian packages: wrk (the serving load generator) and Fashion-MNIST (the
# training benchmark's image set; without it, it trains on the bundled digits). Installed
# when this runs as root with apt; otherwise `make bench` says what is missing.
bench-deps:
	@if command -v wrk >/dev/null && test -d /usr/share/datasets/fashion-mnist; then :; \
	elif command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		apt-get install -y --no-install-recommends wrk dataset-fashion-mnist; \
	fi

# The GPU check (benchmarks/gpu.py, a few minutes on a GPU; skips the CUDA parts without
# one): the default CNN and the MLM encoder on CUDA in fp32 and bf16 against CPU, the
# encoder's MFU, ONNX parity. No `install` first: a lent GPU machine has torch and
# onnxruntime but no network, so it runs on .venv's python where there is one, else $(PYTHON).
gpu-check:
	$(if $(wildcard $(BIN)/python),$(BIN)/python,$(PYTHON)) benchmarks/gpu.py

# The MLflow dashboard on http://127.0.0.1:5000
ui: install
	$(BIN)/dlpipe ui

clean:
	rm -rf ray_results .pytest_cache
