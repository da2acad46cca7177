# twopc — every target bootstraps .venv on a fresh clone; only Python is needed.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
GENERATED := src/twopc/v1 services/wallet/v1 services/order/v1 services/shop/v1

.DEFAULT_GOAL := help
.PHONY: help install node-modules proto proto-check lint test demo console chaos bench fuzz check clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	@touch $@

install: $(STAMP) ## create .venv and install twopc with its dev tools

# examples/node's modules, from its lockfile, as .venv is made: again only when the
# lockfile changed. Without node and npm the Node tests skip, saying so.
NODE_DIR   := examples/node
NODE_STAMP := $(NODE_DIR)/node_modules/.package-lock.json
HAVE_NODE  := $(shell command -v node >/dev/null 2>&1 && command -v npm >/dev/null 2>&1 && echo yes)

$(NODE_STAMP): $(NODE_DIR)/package-lock.json
	npm ci --prefix $(NODE_DIR) --no-audit --no-fund
	@touch $@

ifeq ($(HAVE_NODE),yes)
node-modules: $(NODE_STAMP) ## install examples/node's modules from its lockfile (needs node and npm)
else
node-modules:
	@echo "node or npm not found: the tests of examples/node will skip"
endif

proto: $(STAMP) ## regenerate Python code from protos/
	PYTHON=$(PY) scripts/gen_protos.sh

proto-check: proto ## fail if the checked-in generated code is stale
	@git diff --exit-code --stat -- $(GENERATED) \
	  || { echo "generated code is stale: run 'make proto' and commit"; exit 1; }
	@test -z "$$(git status --porcelain -- $(GENERATED))" \
	  || { echo "generated files are not committed: run 'make proto' and commit"; exit 1; }

lint: $(STAMP) ## ruff (lint + format check) and mypy --strict
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

test: $(STAMP) node-modules ## run the test suite (real processes, real SQLite files; Node's modules when node is here)
	$(VENV)/bin/pytest

demo: $(STAMP) ## the purchase scenario with its failures, as separate processes (TLS=1: mutual TLS, DB=postgres)
	$(PY) -m services.demo $(if $(TLS),--tls) $(if $(DB),--db $(DB))

CONSOLE_PORT ?= 8080
console: $(STAMP) ## the services plus a web console on 127.0.0.1 (CONSOLE_PORT=), with demo fault controls
	$(PY) -m services.console --demo --port $(CONSOLE_PORT)

SEED ?=
DURATION ?= 60
CONCURRENCY ?= 8
chaos: $(STAMP) ## faults at random against concurrent purchases, then the checker (SEED=, DURATION=, CONCURRENCY=, DB=postgres|cluster)
	$(PY) -m services.chaos $(if $(SEED),--seed $(SEED)) $(if $(DB),--db $(DB)) --duration-s $(DURATION) --concurrency $(CONCURRENCY) $(CHAOS_ARGS)

FUZZ_EXAMPLES ?= 20000
fuzz: $(STAMP) ## hypothesis against the real servers under mutual TLS (FUZZ_EXAMPLES=, default 20000; `make test` runs 3000)
	FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(VENV)/bin/pytest -q -s tests/test_fuzz.py --timeout 0

bench: $(STAMP) ## twopc against the floor of its own message pattern, measured in one run
	$(PY) -m bench $(BENCH_ARGS)

check: lint proto-check test ## lint, types, generated-code freshness and tests

clean: ## remove the virtual environment and caches
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache build src/*.egg-info
