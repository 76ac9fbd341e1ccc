# The two commands: `make run` (the whole system) and `make test` (every test).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test stop bench lint setup soak

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

run: setup
	$(BIN)/python manage.py up

# Stops the `manage.py up` running on this data directory (CONVEYOR_DATA_DIR,
# default .data), then its embedded Postgres if it is still running.
stop: setup
	$(BIN)/python -m config.supervisor stop

# pytest exits 5 when it collects no test; that is a failure here too.
test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

# The peers bench/peers.py runs beside Conveyor (Celery, Procrastinate): only here.
$(VENV)/.installed-bench: $(STAMP)
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev,bench]'
	touch $@

# Every benchmark in bench/, Conveyor against the stock alternative in the same
# run, and the peers (Django-Q2, Celery+Redis, Procrastinate) on W1-W4.
bench: setup $(VENV)/.installed-bench
	$(BIN)/python -m bench
	$(BIN)/python bench/api_submit.py
	$(BIN)/python bench/sse_bench.py

# Fault soak (bench/soak.py): SOAK_JOBS mixed jobs (default 10,000), two
# clusters, a worker SIGKILLed every SOAK_KILL_EVERY s; not part of `make test`.
soak: setup
	$(BIN)/python -m bench.soak
