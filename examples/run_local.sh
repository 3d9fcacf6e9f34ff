#!/bin/bash
# Train on one machine without Slurm: one process per GPU (or NPROC gloo processes on CPU), started
# by torchrun through lvx_megatron.torchrun (torchrun's flags; a failed run ends with its one-line errors).
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
python="python"
[[ -x .venv/bin/python ]] && python=".venv/bin/python"
export CUDA_DEVICE_MAX_CONNECTIONS="${CUDA_DEVICE_MAX_CONNECTIONS:-1}"
exec "${python}" -m lvx_megatron.torchrun --standalone --nproc-per-node="${NPROC}" pretrain_mllm.py --config "${config}" "$@"
