#!/bin/bash
# Shared body of the sbatch scripts: one `srun` task per node, each running torchrun (as
# `python -m lvx_megatron.torchrun`: torchrun's code and flags, and a failed run ends with the
# ranks' one-line errors), which starts one pretrain_mllm.py process per GPU and joins the others
# through a c10d rendezvous on the job's first node. Sourced by examples/slurm/*.sbatch after they
# set CONFIG.
#
# Environment (all optional except CONFIG):
#   CONFIG            YAML run config, e.g. examples/configs/llama-3.2-11b-vision.yaml
#   RUN_ROOT          where runs live (default: runs); checkpoints, metrics and the W&B run go to
#                     $RUN_ROOT/$SLURM_JOB_NAME, so a requeued or resubmitted job resumes there
#   GPUS_PER_NODE     default: $SLURM_GPUS_ON_NODE, else 8
#   MASTER_PORT       rendezvous port (default: 20000 + job id % 20000, so jobs sharing a node differ)
#   CONTAINER_IMAGE   run inside this image with pyxis/enroot (srun --container-image)
#   CONTAINER_MOUNTS  extra pyxis mounts (default: the repository and $RUN_ROOT)
#   EXTRA_ARGS        more pretrain_mllm.py flags, e.g. "--train-iters 2000 --lr 2e-5"
# A SIGUSR1 to the batch shell (#SBATCH --signal=B:USR1@300) stops training with a checkpoint and
# requeues the job; after a requeue training resumes from the newest checkpoint.
set -euo pipefail

: "${CONFIG:?set CONFIG to a YAML run config}"
REPO_DIR="${REPO_DIR:-$(pwd)}"
RUN_ROOT="${RUN_ROOT:-runs}"
JOB_NAME="${SLURM_JOB_NAME:-lvx}"
JOB_ID="${SLURM_JOB_ID:-0}"
NNODES="${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}"
GPUS_PER_NODE="${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}"
RUN_DIR="${RUN_ROOT}/${JOB_NAME}"
mkdir -p "${RUN_DIR}"

# Rendezvous on the first node of the allocation.
mapfile -t hosts < <(scontrol show hostnames "${SLURM_JOB_NODELIST:?not inside a Slurm job}")
MASTER_ADDR="${hosts[0]}"
MASTER_PORT="${MASTER_PORT:-$((20000 + JOB_ID % 20000))}"
export MASTER_ADDR MASTER_PORT

# Communication knobs (override any of them in the environment before sbatch):
export CUDA_DEVICE_MAX_CONNECTIONS="${CUDA_DEVICE_MAX_CONNECTIONS:-1}"  # megatron: ordered TP/SP comm kernels
export TORCH_NCCL_ASYNC_ERROR_HANDLING="${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}"  # a failed rank ends the job
export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"                  # INFO to see the chosen transports and rings
export NCCL_IB_HCA="${NCCL_IB_HCA:-}"                     # e.g. mlx5_0,mlx5_1: which InfiniBand adapters
export NCCL_SOCKET_IFNAME="${NCCL_SOCKET_IFNAME:-}"       # e.g. ib0 or eth0 for NCCL's bootstrap sockets
export UCX_NET_DEVICES="${UCX_NET_DEVICES:-}"             # e.g. mlx5_0:1 when UCX carries the traffic
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-8}"

torchrun_args=(
    python -m lvx_megatron.torchrun
    "--nnodes=${NNODES}"
    "--nproc-per-node=${GPUS_PER_NODE}"
    "--rdzv-id=${JOB_ID}"
    "--rdzv-backend=c10d"
    "--rdzv-endpoint=${MASTER_ADDR}:${MASTER_PORT}"
    pretrain_mllm.py
    --config "${CONFIG}"
    --save "${RUN_DIR}/checkpoints"
    --load "${RUN_DIR}/checkpoints"
    --wandb-exp-name "${JOB_NAME}"
    --wandb-save-dir "${RUN_DIR}"
)
read -r -a extra <<< "${EXTRA_ARGS:-}"
torchrun_args+=("${extra[@]}")

srun_args=(srun "--nodes=${NNODES}" --ntasks-per-node=1 --kill-on-bad-exit=1 "--chdir=${REPO_DIR}")
if [[ -n "${CONTAINER_IMAGE:-}" ]]; then
    srun_args+=(
        "--container-image=${CONTAINER_IMAGE}"
        "--container-mounts=${CONTAINER_MOUNTS:-${REPO_DIR}:${REPO_DIR},$(realpath "${RUN_ROOT}"):$(realpath "${RUN_ROOT}")}"
        "--container-workdir=${REPO_DIR}"
    )
fi

echo "job ${JOB_ID} (${JOB_NAME}), restart ${SLURM_RESTART_COUNT:-0}: ${NNODES} node(s) x ${GPUS_PER_NODE} GPU(s), rendezvous ${MASTER_ADDR}:${MASTER_PORT}, run dir ${RUN_DIR}"
echo "${srun_args[*]} ${torchrun_args[*]}"

requeue() {
    echo "SIGUSR1: asking training to checkpoint and stop, then requeueing job ${JOB_ID}"
    kill -TERM "${srun_pid}" 2>/dev/null || true
    wait "${srun_pid}" || true
    scontrol requeue "${JOB_ID}"
    exit 0
}
trap requeue USR1

"${srun_args[@]}" "${torchrun_args[@]}" &
srun_pid=$!
wait "${srun_pid}"
