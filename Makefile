# The two commands of the README are `make demo` and `make test`; both set up the venv when needed.
VENV ?= $(or $(DYT_VENV),$(CURDIR)/.venv)
PY := $(VENV)/bin/python
export DYT_VENV := $(VENV)

.PHONY: setup demo test lint bench
setup:
	@scripts/setup.sh

demo: setup
	$(PY) scripts/demo.py --out runs/demo

# Two pytest-xdist workers, each taking whole test files (module fixtures are built once): on a
# 2-core box the suite spends much of its time in launcher start-up and imports, which leave a core
# idle. TEST_WORKERS=0 runs it in one process.
TEST_WORKERS ?= 2
test: setup
	$(PY) -m ruff check .
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile

lint: setup
	$(PY) -m ruff check .

bench: setup
	$(VENV)/bin/dyt-bench --json runs/bench.json
