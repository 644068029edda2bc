# Two commands: `make run` (set up, then run the pipeline on the embedded corpus) and
# `make test` (set up, then run the tests). Setup is a local virtual environment in .venv.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin

# Quiet and offline: no Prefect/MLflow analytics or telemetry, no model hub.
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export DO_NOT_TRACK := 1
export MLFLOW_DISABLE_TELEMETRY := true
export HF_HUB_OFFLINE := 1
# The temporary Prefect server may need longer than Prefect's 20 s to start on a busy machine.
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS ?= 120

.PHONY: run test setup setup-test bench ui clean help

help:
	@echo "make run    set up .venv and run the pipeline on the embedded 走れメロス corpus"
	@echo "make test   set up .venv (with test extras) and run the test suite"
	@echo "make bench  time make run's pipeline (first and cached second run)"
	@echo "make ui     open the MLflow UI on the runs (Ctrl-C stops it)"
	@echo "make clean  remove pipeline outputs (melos-work/, mlflow.db, mlruns/)"

$(BIN)/python:
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Melos needs Python 3.11 or newer; run: make PYTHON=python3.11 ...")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# torch is installed first with its exact pin: a wheel of that version found locally
# (e.g. a CPU build) wins, so pip never resolves a different, multi-GB CUDA build first.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet "torch==2.13.0"
	$(BIN)/python -m pip install --quiet -e .
	@touch $@

$(VENV)/.installed-test: pyproject.toml $(VENV)/.installed
	$(BIN)/python -m pip install --quiet -e '.[test]'
	@touch $@

setup: $(VENV)/.installed
setup-test: $(VENV)/.installed-test

run: setup
	$(BIN)/melos pretrain

test: setup-test
	$(BIN)/python -m pytest

bench: setup
	$(BIN)/python bench/pipeline_wall_time.py

ui: setup
	$(BIN)/melos ui

clean:
	rm -rf melos-work mlflow.db mlflow.db.lock mlruns
