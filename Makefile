# One entry point for humans and CI. `make test` works on a fresh machine: it creates .venv,
# installs torch first (so no dependency can pull a different build), then every other package
# from a lock with hashes (requirements/), then the project itself.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# A CPU build by default. Where pip would fetch a CUDA build instead, point it at a CPU wheel
# index or a local wheel, e.g. make TORCH_PIP_ARGS="--index-url <cpu wheel index>".
TORCH_SPEC ?= torch==2.13.0
TORCH_PIP_ARGS ?=

.PHONY: install install-serve serve lock lint format test test-fast clean

$(BIN)/.torch:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)" $(TORCH_PIP_ARGS)
	touch $@

# A lock is installed whole, hashes checked (a package it lacks is an error, not a download);
# the project goes on top without resolving anything, and pip check confirms the result.
define install_locked
	$(BIN)/python -m pip install --quiet --require-hashes -r $(1)
	$(BIN)/python -m pip install --quiet --no-deps -e .
	$(BIN)/python -m pip check
	touch $@
endef

# The serving install: the service and the shipped model, no training-only packages.
$(BIN)/.installed-serve: pyproject.toml requirements/serve.txt $(BIN)/.torch
	$(call install_locked,requirements/serve.txt)

$(BIN)/.installed: pyproject.toml requirements/dev.txt $(BIN)/.torch
	$(call install_locked,requirements/dev.txt)

install-serve: $(BIN)/.installed-serve
install: $(BIN)/.installed

# Serves models/$(SENTIMENT_MODEL_NAME) (default imdb-bigru) on 127.0.0.1:8000; every
# SENTIMENT_* variable in the environment applies (see README). The service runs itself on
# jemalloc where it is installed (Debian: libjemalloc2), as in the container.
serve: install-serve
	$(BIN)/python -m service

# Re-resolves the locks from pyproject.toml (keeping every pin that still fits; UPGRADE=--upgrade
# moves to the newest releases), for CPython 3.11 on Linux. Torch stays out of them: its build
# (CPU or CUDA) is the install's choice above; TORCH_SPEC only fixes the version its own
# dependencies are resolved for. dev.txt starts from serve.txt's pins so the two agree.
LOCK := CUSTOM_COMPILE_COMMAND="make lock" $(BIN)/pip-compile --quiet --generate-hashes \
	--strip-extras --no-emit-index-url --no-emit-find-links --unsafe-package torch \
	--constraint $(VENV)/torch-spec.txt $(UPGRADE)
lock: $(BIN)/.torch
	$(BIN)/python -m pip install --quiet --require-hashes -r requirements/dev.txt
	echo "$(TORCH_SPEC)" >$(VENV)/torch-spec.txt
	$(LOCK) -o requirements/serve.txt pyproject.toml
	cp requirements/serve.txt requirements/dev.txt
	$(LOCK) --extra train --extra dev --extra bench -o requirements/dev.txt pyproject.toml

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
