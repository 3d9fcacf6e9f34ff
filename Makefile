# The two commands of the README: `make demo` (main job on the embedded default) and `make test`.
# Both create the virtual environment first (scripts/setup_env.sh), so they work on a fresh clone.
VENV ?= .venv
PY := $(VENV)/bin/python
NPROC ?= 4

.PHONY: setup demo test lint
setup:
	@LVX_VENV=$(VENV) bash scripts/setup_env.sh

demo: setup
	$(PY) -m lvx_megatron.demo --world-size $(NPROC)

lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

test: lint
	$(PY) -m pytest -q
