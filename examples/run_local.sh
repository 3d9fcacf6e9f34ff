#!/bin/bash
# Train on one machine without Slurm: one process per GPU (or NPROC gloo processes on CPU).
#   examples/run_local.sh examples/configs/tiny.yaml [pretrain_mllm.py flags...]
#   NPROC=8 examples/run_local.sh examples/configs/llama-3.2-11b-vision.yaml --train-iters 100
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
config="${1:?usage: examples/run_local.sh CONFIG.yaml [pretrain_mllm.py flags...]}"
shift
if [[ -z "${NPROC:-}" ]]; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        NPROC="$(nvidia-smi -L | wc -l)"
    else
        NPROC=2
    fi
fi
torchrun="torchrun"
[[ -x .venv/bin/torchrun ]] && torchrun=".venv/bin/torchrun"
export CUDA_DEVICE_MAX_CONNECTIONS="${CUDA_DEVICE_MAX_CONNECTIONS:-1}"
exec "${torchrun}" --standalone --nproc-per-node="${NPROC}" pretrain_mllm.py --config "${config}" "$@"
