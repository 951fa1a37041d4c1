# pgjobs — every task a developer or CI runs has one target here. `make help` lists them.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.DEFAULT_GOAL := help

help: ## list the targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { echo "pgjobs needs Python >= 3.11 (found $$($(PYTHON) --version))"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev,bench]'
	touch $(STAMP)

install: $(STAMP) ## create .venv and install pgjobs with its dev and benchmark tools

run: $(STAMP) ## start the embedded Postgres, migrate, run demo workers and show their jobs live
	$(PY) -m pgjobs demo

chromium: ## install Debian's chromium for the gateway's browser test (skipped if present)
	@test -x /usr/bin/chromium || { apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y chromium; }

pgbouncer: ## install Debian's pgbouncer for the PgBouncer tests (skipped if present)
	@test -x /usr/sbin/pgbouncer || { apt-get update < /dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y pgbouncer < /dev/null; }

# Two tests at a time (pytest-xdist; how tests/conftest.py shares them out). PYTEST_WORKERS=0
# runs one at a time: needed with PGJOBS_TEST_DSN, one server both processes would share.
PYTEST_WORKERS ?= 2
test: $(STAMP) chromium pgbouncer ## run the test suite against real PostgreSQL
	$(PY) -m pytest -n $(PYTEST_WORKERS)

lint: $(STAMP) ## ruff check + format check
	$(PY) -m ruff check src tests
	$(PY) -m ruff format --check src tests

typecheck: $(STAMP) ## mypy --strict on src
	$(PY) -m mypy

bench: $(STAMP) ## benchmarks vs procrastinate, pgqueuer and awa into bench/results/ (ARGS=--quick: < 5 min)
	$(PY) -m bench $(ARGS)

chaos: $(STAMP) ## 50,000 jobs through workers and the gateway under kills, a PG restart and a 5-min outage (> 6 min)
	PYTHONPATH=src:tests $(PY) tests/chaos/chaos_harness.py --jobs 50000 --outage 300

clean: ## remove the virtualenv, caches and the embedded database under .pgjobs/
	rm -rf $(VENV) .pgjobs .pytest_cache .mypy_cache .ruff_cache

.PHONY: help install chromium pgbouncer run test lint typecheck clean
.PHONY: bench chaos
