PY ?= python3

.PHONY: run test lint format deps bench

# The README's run command: install, then serve a demo task offline (embedded store, seeded backbone).
run:
	$(PY) -m pip install -q -e .
	lpt-serve --demo

# The README's test command: install everything the tests need, then run the whole suite.
test: deps
	$(PY) -m pytest -q

deps:
	PY=$(PY) ./scripts/install-deps.sh

lint:
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format:
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

bench:
	$(PY) -m bench engine
