# Lakehouse Seq2Seq: `make demo` and `make test` set themselves up (idempotent).
SHELL := /bin/bash
# A pipe fails when any part fails (`make demo` tees the pipeline's output).
.SHELLFLAGS := -o pipefail -c
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TOOLS := .tools
AZURITE := $(TOOLS)/node_modules/.bin/azurite-blob
MODELS := .work/models
export SPARK_LOCAL_IP ?= 127.0.0.1
export TOKENIZERS_PARALLELISM ?= false
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export HF_HUB_DISABLE_TELEMETRY ?= 1
export MLFLOW_DISABLE_TELEMETRY ?= true
export DO_NOT_TRACK ?= 1
# `make demo`'s temporary Prefect server: Prefect waits 20 s for it, too little on a busy 2-core box.
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS ?= 120
PYTEST_ARGS ?=

.PHONY: setup demo demo-azure test test-all test-docker ci-extra bench bench-scale lint format server \
        server-stop serve deploy worker image image-gpu engine models clean help

help:
	@echo "make demo | test | test-all | test-docker | ci-extra | bench | lint | server | deploy | image"

## setup: .venv with every pin from constraints.txt, Azurite in .tools/ (idempotent)
setup: $(VENV)/.installed $(AZURITE)

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch first, from the pinned version only (an unpinned torch would pull a CUDA build)
	$(PY) -m pip install --quiet -c constraints.txt "torch==2.13.0"
	$(PY) -m pip install --quiet -c constraints.txt -e ".[dev]"
	touch $@

$(AZURITE): deployments/tools/package.json
	mkdir -p $(TOOLS)
	cp deployments/tools/package.json $(TOOLS)/package.json
	npm install --silent --no-audit --no-fund --prefix $(TOOLS)
	touch $@

## models: tiny T5 and mBART built locally from the shipped sample (no Hub needed)
models: setup
	$(PY) -m tasks.train.tiny_models --out $(MODELS)

## demo: the whole pipeline on embedded defaults (local lakehouse, Spark, MLflow sqlite)
demo: models
	@mkdir -p .work
	$(PY) -m flows pipeline --config configs/demo.yaml --json | tee .work/demo-result.log
	@tail -n 1 .work/demo-result.log > .work/demo-result.json
	@$(PY) -m flows.where --config configs/demo.yaml --result .work/demo-result.json

## demo-azure: the same against Azurite through the Prefect blocks
demo-azure: models
	bash deployments/demo_azure.sh

## test: the default suite; `ci` tests (PostgreSQL variants) run in ci-extra, `slow` (load) in test-all
test: setup
	$(PY) -m pytest -m "not slow and not docker and not ci" $(PYTEST_ARGS)

test-all: setup
	$(PY) -m pytest -m "slow or not slow" --ignore=tests/docker $(PYTEST_ARGS)

## ci-extra: what CI proves beyond `make test` (.ci/run): the tests marked `ci`, `make demo` and
## its re-run (which must report nothing new; flows.where prints both), lint
ci-extra: setup models
	$(PY) -m pytest -m "ci and not slow and not docker" $(PYTEST_ARGS)
	@mkdir -p .work/ci
	$(MAKE) --no-print-directory demo 2>&1 | tee .work/ci/demo-1.log
	$(MAKE) --no-print-directory demo 2>&1 | tee .work/ci/demo-2.log
	$(PY) .ci/check_demo.py .work/ci/demo-1.log .work/ci/demo-2.log
	$(MAKE) --no-print-directory lint

## test-docker: podman engine + local base image + project image, then the Docker tests
test-docker: setup image
	DOCKER_HOST=unix://$(CURDIR)/.work/podman/podman.sock LAKEHOUSE_REQUIRE_ENGINE=1 \
	  $(PY) -m pytest -m docker tests/docker $(PYTEST_ARGS)

engine:
	bash deployments/engine/setup-podman.sh

image: engine
	bash deployments/engine/build-image.sh

image-gpu: engine
	TORCH_FLAVOUR=cu128 bash deployments/engine/build-image.sh

## bench: each benchmark prints `name: value` lines and ratios; exits 1 if a goal is missed
bench: models
	@rc=0; for b in bronze silver train; do echo "== bench/$$b.py"; \
	  $(PY) -m bench.$$b || rc=1; done; exit $$rc

## bench-scale: the silver benchmark on 1 GB of text (opt-in: it takes long)
bench-scale: models
	$(PY) -m bench.silver --mb 1000

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/hadolint Dockerfile

format: setup
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

server: setup
	bash deployments/server.sh start

## serve: models:/<tracking.registered_model>@champion over REST on 127.0.0.1:$(SERVE_PORT) (CONFIG=...)
SERVE_PORT ?= 5001
serve: setup
	$(PY) -m flows.serve $(if $(CONFIG),--config $(CONFIG)) --port $(SERVE_PORT)

server-stop:
	bash deployments/server.sh stop

## worker: run flows of a work pool here (POOL=process|docker-cpu|docker-gpu)
worker: setup
	$(VENV)/bin/prefect worker start --pool $${POOL:-process}

deploy: setup models
	$(PY) -m deployments.deploy

clean:
	rm -rf lakehouse mlflow.db mlruns .work/staging .work/train
