# The two commands of the README are `make demo` and `make test`; both set up the venv when needed.
VENV ?= $(or $(DYT_VENV),$(CURDIR)/.venv)
PY := $(VENV)/bin/python
export DYT_VENV := $(VENV)

.PHONY: setup demo test lint bench
setup:
	@scripts/setup.sh

demo: setup
	$(PY) scripts/demo.py --out runs/demo

test: setup
	$(PY) -m ruff check .
	$(PY) -m pytest

lint: setup
	$(PY) -m ruff check .

bench: setup
	$(VENV)/bin/dyt-bench --json runs/bench.json
