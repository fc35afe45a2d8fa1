# Verdict's one task runner: people and CI (.ci/run) call the same targets.
# `make help` lists them.

# python3.11 if the machine has it, else python3 (pyproject.toml asks for >=3.11 and pip refuses anything older).
PYTHON ?= $(shell command -v python3.11 2>/dev/null || command -v python3 2>/dev/null)
VENV := .venv
BIN := $(VENV)/bin
# Written after a successful install; pyproject.toml being newer than it means the install is stale.
STAMP := $(VENV)/.installed
# The JavaScript Standard Webhooks library the tests verify Verdict's signatures with (an independent implementation).
INTEROP_JS := tests/interop/standardwebhooks-js
INTEROP_STAMP := $(INTEROP_JS)/node_modules/.package-lock.json

PORT ?= 8000
PYTEST_ARGS ?=
# Test processes (pytest-xdist); 0 runs everything in this process. Tests that run Celery workers never run beside
# each other, whatever the number (tests/lanes.py, docs/testing.md).
TEST_WORKERS ?= 2
PYTEST := $(BIN)/python -m pytest -n $(TEST_WORKERS)

# migrations-check runs Alembic against a scratch database on the same PostgreSQL the tests use.
# PG_ADMIN_URL is a database to connect to while creating and dropping the scratch one.
# Unique per run, so two checkouts checking at once on one PostgreSQL never drop each other's scratch database.
MIGRATIONS_CHECK_DB := verdict_migrations_check_$(shell od -An -N4 -tx4 /dev/urandom | tr -d " ")
PG_ADMIN_URL ?= $(or $(TEST_DATABASE_URL),postgresql+psycopg://postgres@127.0.0.1:5432/postgres)
# psql and psycopg take libpq URLs, which know no SQLAlchemy "+driver" suffix.
PG_ADMIN_DSN = $(subst +psycopg,,$(PG_ADMIN_URL))
# The admin URL with its database name swapped for the scratch database (query string, if any, kept).
MIGRATIONS_CHECK_URL = $(shell printf '%s' '$(PG_ADMIN_URL)' \
	| sed -E 's#^([A-Za-z0-9+.-]+://[^/?]*)(/[^?]*)?#\1/$(MIGRATIONS_CHECK_DB)#')

# Run one SQL statement on the admin database: psql when installed, else psycopg from the venv.
# PGOPTIONS (read by libpq, so by both) hides DROP ... IF EXISTS's "does not exist, skipping" notice.
define pg_admin
if command -v psql >/dev/null 2>&1; then \
	PGOPTIONS='-c client_min_messages=warning' psql '$(PG_ADMIN_DSN)' -X -q -v ON_ERROR_STOP=1 -c '$(1)'; \
else \
	PGOPTIONS='-c client_min_messages=warning' $(BIN)/python -c 'import sys, psycopg; psycopg.connect(sys.argv[1], autocommit=True).execute(sys.argv[2])' \
		'$(PG_ADMIN_DSN)' '$(1)'; \
fi
endef

.DEFAULT_GOAL := help
# `make -j ci` must still run its steps in the order given.
.NOTPARALLEL:
.PHONY: help install interop tools browser dev services test test-fast lint typecheck migrations-check ci bench train-engine eval clean

help: ## List the targets
	@echo "Usage: make <target> [PORT=8000] [PYTEST_ARGS='-k name'] [BENCH_ARGS='--window 120']"
	@echo
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  %-18s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

install: $(STAMP) ## Create .venv and install Verdict with its dev tools (again only when pyproject.toml changes)

interop: ## Install the JavaScript Standard Webhooks verifier the webhook tests use (needs Node.js and npm)
	@if command -v npm >/dev/null 2>&1; then $(MAKE) --no-print-directory $(INTEROP_STAMP); \
	elif [ "$${CI:-}" = true ]; then echo "make interop: npm is not installed; CI needs it." >&2; exit 1; \
	else echo "make interop: no npm here, so the JavaScript signature check will be skipped (CI runs it)." >&2; fi

browser: ## Install headless Chromium and chromedriver for the console's browser test (Debian packages; root)
	bash ops/ensure-browser.sh

$(INTEROP_STAMP): $(INTEROP_JS)/package.json $(INTEROP_JS)/package-lock.json
	npm ci --prefix $(INTEROP_JS) --no-audit --no-fund --loglevel=error

$(BIN)/python:
	@test -n "$(PYTHON)" || { echo "No python3.11 or python3 on PATH: install Python 3.11 or newer." >&2; exit 1; }
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --disable-pip-version-check --no-input -e '.[dev]'
	@touch $@

dev: install ## Run the API and a worker on the embedded default (SQLite, no servers) on PORT
	$(BIN)/verdict dev --port $(PORT)

services: ## Make sure PostgreSQL and Redis answer (starts the machine's own if it can)
	bash ops/ensure-services.sh

tools: ## Make sure promtool is installed for the alert-rule checks (apt-get as root; CI needs it)
	bash ops/ensure-tools.sh

# pytest's exit code 5 means "no tests collected"; it fails the build like any other non-zero code.
define run_pytest
@status=0; $(PYTEST) $(1) $(PYTEST_ARGS) || status=$$?; \
if [ $$status -eq 5 ]; then echo "make $@: pytest collected no tests; that is a failure." >&2; fi; \
exit $$status
endef

test: install interop tools browser services ## Run the whole test suite (extra pytest arguments in PYTEST_ARGS, TEST_WORKERS=2)
	$(call run_pytest,)

# The fast lane fuzzes each operation with fewer cases (FUZZ_MAX_EXAMPLES, 50 in `make test`) to stay near a minute.
test-fast: export FUZZ_MAX_EXAMPLES ?= 10
test-fast: install services ## The fast lane: every test that starts no process and no server (about a minute)
	$(call run_pytest,-m "not integration")

lint: install ## ruff check
	$(BIN)/ruff check .

typecheck: install ## mypy, strict, on app/ and workers/
	$(BIN)/mypy

# The scratch database is dropped afterwards whether Alembic passed or not.
migrations-check: install services ## alembic upgrade head + alembic check on a scratch PostgreSQL database
	@echo "migrations-check: scratch database $(MIGRATIONS_CHECK_DB)"
	@$(call pg_admin,DROP DATABASE IF EXISTS $(MIGRATIONS_CHECK_DB) WITH (FORCE))
	@$(call pg_admin,CREATE DATABASE $(MIGRATIONS_CHECK_DB))
	@status=0; \
	{ DATABASE_URL='$(MIGRATIONS_CHECK_URL)' $(BIN)/alembic upgrade head \
	  && DATABASE_URL='$(MIGRATIONS_CHECK_URL)' $(BIN)/alembic check; } || status=$$?; \
	$(call pg_admin,DROP DATABASE IF EXISTS $(MIGRATIONS_CHECK_DB) WITH (FORCE)); \
	exit $$status

ci: install services lint typecheck migrations-check test ## Everything CI runs, in order

# Not part of `make test` or CI: it takes several minutes and measures the machine it runs on.
BENCH_ARGS ?=
bench: install services ## Run the benchmark (ops/bench/README.md); writes ops/bench/RESULTS.md, ends with a RESULT line
	$(BIN)/python ops/bench/run.py $(BENCH_ARGS)

# Not part of `make test` or CI either: it takes minutes (ops/chaos/README.md). It starts its own PostgreSQL and Redis.
CHAOS_ARGS ?=
.PHONY: chaos
chaos: install ## The chaos run (ops/chaos/README.md): faults while N texts drain; writes ops/chaos/RESULTS.md, ends with a RESULT line
	$(BIN)/python ops/chaos/run.py $(CHAOS_ARGS)

# The settings are described once, in app/config.py; tests/unit/test_settings_reference.py fails until this is run.
.PHONY: settings-docs
settings-docs: install ## Regenerate .env.example and docs/configuration.md from app/config.py
	$(BIN)/verdict settings --format env > .env.example.new && mv .env.example.new .env.example
	$(BIN)/verdict settings --format markdown > docs/configuration.md.new && mv docs/configuration.md.new docs/configuration.md

# Not part of `make test` or CI either: training and evaluating take minutes (ops/engine/README.md).
DATA ?= ../shared/data/moderation
EVAL_ARGS ?=
train-engine: install ## Train the embedded engine on DATA (default ../shared/data/moderation); writes the shipped artifact
	$(BIN)/python ops/engine/train.py $(DATA)

eval: install ## Evaluate the shipped engine (quality by cross-validation, cascade share, speed, memory); ends with a RESULT line
	$(BIN)/python ops/engine/evaluate.py $(DATA) $(EVAL_ARGS)

clean: ## Remove var/ (the embedded default's data) and caches; keeps .venv
	rm -rf var .pytest_cache .mypy_cache .ruff_cache build dist *.egg-info
	find . -path ./$(VENV) -prune -o -type d -name __pycache__ -prune -exec rm -rf {} +
