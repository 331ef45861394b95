# Every target sets itself up on a fresh machine: it creates .venv and installs
# the pinned dependencies (requirements-lock.txt) the first time, and again
# whenever pyproject.toml or the lock file changes. Running needs only the runtime
# (RUN_STAMP); the tests and the checks add the dev extras on top (DEV_STAMP).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
RUN_STAMP := $(VENV)/.installed-run
DEV_STAMP := $(VENV)/.installed-dev
PYTEST_ARGS ?=

.PHONY: install install-dev run demo test test-load test-failover test-servers bench check schema clean browser

$(RUN_STAMP): pyproject.toml requirements-lock.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c requirements-lock.txt -e .
	touch $(RUN_STAMP)

$(DEV_STAMP): $(RUN_STAMP)
	$(BIN)/python -m pip install --quiet -c requirements-lock.txt -e '.[dev]'
	touch $(DEV_STAMP)

install: $(RUN_STAMP)  ## what running needs
install-dev: $(DEV_STAMP)  ## plus the tests' and the checks' tools

run: $(RUN_STAMP)  ## the main job: the whole embedded stack on http://127.0.0.1:8000
	$(BIN)/chatllm up

demo: $(RUN_STAMP)  ## a short scripted workload through a throw-away stack
	$(BIN)/chatllm demo

# The dashboard's browser test drives Debian's chromium (playwright's own browser
# download is not reachable from here).
CHROMIUM := $(shell command -v chromium 2>/dev/null)
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

browser:
ifeq ($(CHROMIUM),)
	$(SUDO) apt-get update -qq
	DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq chromium >/dev/null
endif

test: $(DEV_STAMP) browser  ## the whole suite: unit, integration (real tansu, chDB, Ray) and e2e
	mkdir -p test-artifacts && rm -f test-artifacts/.coverage test-artifacts/.coverage.*
	$(BIN)/python -m pytest --cov --cov-report= $(PYTEST_ARGS)
	$(BIN)/python .ci/coverage.py

# The load test runs 90 s within `make test`; this holds the rate for longer (LOAD_TEST_S).
LOAD_TEST_S ?= 600
test-load: $(DEV_STAMP)  ## the steady-rate load test for LOAD_TEST_S seconds (10 minutes)
	LOAD_TEST_S=$(LOAD_TEST_S) $(BIN)/python -m pytest -s tests/faults/test_load.py

bench: $(RUN_STAMP)
	$(BIN)/python -m benchmarks

test-failover: $(DEV_STAMP)  ## the 16 failover cases with the issue's own waits (20 s first token, 60 s down)
	FAILOVER_PROFILE=full $(BIN)/python -m pytest -q tests/faults/test_failover.py

# Apache Kafka and a ClickHouse server in containers (testcontainers); without a container
# engine it says so in one line and exits 0. Not part of `make test`.
test-servers: $(DEV_STAMP)  ## the production path: the suite's server half on Kafka and ClickHouse
	$(BIN)/python -m tests.servers

check: $(DEV_STAMP)  ## lint, format, types, the layer rule, and the checked-in event schema
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports
	$(BIN)/python -m events.schema --check docs/events.schema.json
	$(BIN)/python -m events.schema --observations --check docs/observations.schema.json
	$(BIN)/python -m events.schema --readme README.md --check
	$(BIN)/python .ci/check_workflows.py

schema: $(RUN_STAMP)  ## regenerate docs/events.schema.json from the event types
	$(BIN)/python -m events.schema > docs/events.schema.json
	$(BIN)/python -m events.schema --observations > docs/observations.schema.json
	$(BIN)/python -m events.schema --readme README.md

clean:
	rm -rf $(VENV) .chatllm .pytest_cache .mypy_cache .ruff_cache test-artifacts
