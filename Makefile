# edgeproxy: `make run` starts the gateway on embedded defaults; `make test` installs
# everything the tests need (Python packages, Redis server) and runs the whole suite.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
HOST ?= 127.0.0.1
PORT ?= 8787
MOCK_PORT ?= 9999
PYTEST_ARGS ?=

.PHONY: run demo test reliability bench install install-test services browser bench-tools lint constraints clean help

help:
	@echo "make run          run the gateway on embedded defaults (http://$(HOST):$(PORT)/v1)"
	@echo "make demo         run the gateway in front of the bundled mock provider"
	@echo "make test         install test dependencies and services, run the whole suite"
	@echo "make reliability  the longer fault, load and hostile-input suite"
	@echo "make bench        benchmarks against direct, nginx and LiteLLM; writes bench/RESULTS.md"

$(BIN)/python:
	@$(PYTHON) -m venv $(VENV) 2>/dev/null || { \
	  echo "python3 -m venv failed; installing Debian's python3-venv"; \
	  apt-get update -qq && apt-get install -y -qq python3-venv && $(PYTHON) -m venv $(VENV); }
	$(BIN)/python -m pip install -q --upgrade pip

# constraints.txt pins every package to the versions the suite last passed with, so a new
# release upstream cannot change a clean clone's result; refresh it with `make constraints`.
$(VENV)/.installed: $(BIN)/python pyproject.toml constraints.txt
	$(BIN)/pip install -q -c constraints.txt -e .
	@touch $@

$(VENV)/.installed-test: $(VENV)/.installed pyproject.toml constraints.txt
	$(BIN)/pip install -q -c constraints.txt -e '.[test]'
	@touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

run: install
	$(BIN)/edgeproxy serve --host $(HOST) --port $(PORT)

demo: install
	@echo "mock provider on http://127.0.0.1:$(MOCK_PORT); gateway on http://$(HOST):$(PORT)/v1"
	@$(BIN)/python -m bench.mock_upstream --port $(MOCK_PORT) & MOCK=$$!; \
	  trap "kill $$MOCK" EXIT INT TERM; \
	  $(BIN)/edgeproxy serve --host $(HOST) --port $(PORT) --upstream http://127.0.0.1:$(MOCK_PORT)

# Redis: the tests of the shared backends talk to a real server on 127.0.0.1:6379.
services:
	@command -v redis-server >/dev/null || { apt-get update -qq && apt-get install -y -qq redis-server; }
	@redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1 || { \
	  mkdir -p /var/lib/redis /var/log/redis; \
	  redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no \
	    --dir /var/lib/redis --logfile /var/log/redis/ci.log; \
	  for i in $$(seq 50); do redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1 && break; sleep 0.1; done; }
	@redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null && echo "redis: up on 127.0.0.1:6379"

# Headless Chromium for the admin page test: Debian's build (Playwright's own download is not used).
browser:
	@command -v chromium >/dev/null || { apt-get update -qq && apt-get install -y -qq chromium; }

# The bench's tools, whose tests run them against the mock: wrk, the C load generator of
# `bench.compare --client wrk`, and valgrind, whose callgrind counts `bench.instructions`.
bench-tools:
	@command -v wrk >/dev/null || { apt-get update -qq && apt-get install -y -qq wrk; }
	@command -v valgrind >/dev/null || { apt-get update -qq && apt-get install -y -qq valgrind; }

test: install-test services browser bench-tools
	$(BIN)/pytest -q -m "not slow" $(PYTEST_ARGS)

reliability: install-test services
	$(BIN)/pytest -q -m slow $(PYTEST_ARGS)

bench: install-test
	$(BIN)/python -m bench.compare

lint: install-test
	$(BIN)/pip install -q ruff mypy
	$(BIN)/ruff check edgeproxy bench tests
	$(BIN)/mypy edgeproxy

constraints: install-test
	$(BIN)/pip freeze --exclude-editable | grep -viE '^(py-spy|mypy|mypy.extensions|ruff|pathspec|librt)==' > constraints.txt

clean:
	rm -rf $(VENV) .edgeproxy .pytest_cache test-output
