PY ?= python3

.PHONY: run test lint format deps bench

# The README's run command: install, then serve a demo task offline (embedded store, seeded backbone).
run:
	@echo "make run: installing lpt-serve and its dependencies into $$($(PY) -c 'import sys; print(sys.prefix)')."
	@echo "  PyTorch is most of it: from PyPI on Linux the CUDA build, about 5.5 GB installed; on a machine without"
	@echo "  an NVIDIA GPU install the CPU build first (about 0.7 GB, see README.md). Already installed: skipped."
	$(PY) -m pip install --progress-bar on -e .
	$(PY) -m service.cli --demo

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
