# The two commands of the README: `make demo` (main job on the embedded default) and `make test`.
# Both create the virtual environment first (scripts/setup_env.sh), so they work on a fresh clone.
VENV ?= .venv
PY := $(VENV)/bin/python
NPROC ?= 4
CONFIG ?= examples/configs/tiny.yaml

.PHONY: setup lock demo demo-ops test lint
# The venv at the versions of requirements/lock.txt (torch's CPU wheels where there is no GPU).
setup:
	@LVX_VENV=$(VENV) bash scripts/setup_env.sh

# Re-resolve pyproject.toml's dependencies afresh and rewrite requirements/lock.txt (then review and test).
lock:
	bash scripts/lock_env.sh

# Train the tiny model on the generated video QA data: CPU, 2 gloo ranks, context parallel 2.
# lvx_megatron.torchrun is torchrun that ends a failed run with the ranks' one-line errors.
demo: setup
	$(PY) -m lvx_megatron.torchrun --nproc-per-node=2 pretrain_mllm.py --config $(CONFIG)

# The distributed cross-attention op alone: exactness and bytes moved per strategy.
demo-ops: setup
	$(PY) -m lvx_megatron.demo --world-size $(NPROC)

SHELL_SCRIPTS := scripts/setup_env.sh scripts/lock_env.sh scripts/fetch_gpu_wheels.sh .ci/run examples/run_local.sh examples/slurm/launch.sh examples/slurm/*.sbatch

lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(VENV)/bin/shellcheck $(SHELL_SCRIPTS)
	$(VENV)/bin/hadolint Dockerfile

test: lint
	$(PY) -m pytest -q --durations=20
