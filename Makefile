# The whole set-up is `make demo` or `make test`: each builds .venv from scratch when missing.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# Project-local state for the demo: Prefect's database and results, the embedded object store
# (the folders are made first: Prefect warns when PREFECT_HOME's parent is missing). The
# temporary Prefect server gets 180 s to start, enough on a loaded 2-core machine.
DEMO_ENV := WAN_TASKS_HOME=$(CURDIR)/var/wan-tasks PREFECT_HOME=$(CURDIR)/var/prefect \
	PREFECT_SERVER_ANALYTICS_ENABLED=false PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS=180

.PHONY: demo test lint typecheck bench soak stack clean

$(STAMP): pyproject.toml tests/js/package-lock.json
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade "pip>=24,<27"
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	if command -v npm >/dev/null; then (cd tests/js && npm ci --silent --no-audit --no-fund) || echo "tests/js: npm ci failed, the official JS client tests will be skipped"; fi
	touch $(STAMP)

demo: $(STAMP)
	mkdir -p var/prefect var/wan-tasks
	$(DEMO_ENV) $(BIN)/wan-video demo

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/python -m pytest -q -ra -n 2 --dist loadgroup

# Benchmarks (bench/): print tables with a baseline measured in the same run; see BENCHMARKS.md.
bench: $(STAMP)
	$(BIN)/python -m bench.run_all

# Reliability suites (crash-resume, fault soak, bad input, secrets): see RELIABILITY.md.
soak: $(STAMP)
	$(BIN)/python -m reliability.run_all

# A complete local stack (Prefect server, work pool, limits, SeaweedFS, emulator, worker).
stack: $(STAMP)
	$(BIN)/python -m deployments.stack up

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

clean:
	rm -rf $(VENV) var build *.egg-info
