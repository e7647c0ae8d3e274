# One entry point for humans and CI. `make test` works on a fresh machine: it creates .venv,
# installs torch first (so no dependency can pull a different build), then the project.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# A CPU build by default. Where pip would fetch a CUDA build instead, point it at a CPU wheel
# index or a local wheel, e.g. make TORCH_PIP_ARGS="--index-url <cpu wheel index>".
TORCH_SPEC ?= torch==2.13.0
TORCH_PIP_ARGS ?=

.PHONY: install install-serve serve lint format test test-fast clean

$(BIN)/.torch:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)" $(TORCH_PIP_ARGS)
	touch $@

# The serving install: the service and the shipped model, no training-only packages.
$(BIN)/.installed-serve: pyproject.toml $(BIN)/.torch
	$(BIN)/python -m pip install --quiet -e .
	touch $@

$(BIN)/.installed: pyproject.toml $(BIN)/.torch
	$(BIN)/python -m pip install --quiet -e ".[train,dev,bench]"
	touch $@

install-serve: $(BIN)/.installed-serve
install: $(BIN)/.installed

# Serves models/$(SENTIMENT_MODEL_NAME) (default imdb-bigru) on 127.0.0.1:8000; every
# SENTIMENT_* variable in the environment applies (see README). The service runs itself on
# jemalloc where it is installed (Debian: libjemalloc2), as in the container.
serve: install-serve
	$(BIN)/python -m service

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/hadolint Dockerfile deploy/swarm/haproxy.Dockerfile deploy/swarm/v2.Dockerfile

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

test: lint
	$(BIN)/pytest

test-fast: install
	$(BIN)/pytest -m "not slow"

clean:
	rm -rf $(VENV) .cache .pytest_cache .mypy_cache .ruff_cache *.egg-info
