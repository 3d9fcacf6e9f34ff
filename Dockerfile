# lvx-megatron cluster image: NGC PyTorch (CUDA, NCCL, Transformer Engine, apex) + this project.
#   docker build -t lvx-megatron:latest .
#   docker run --gpus all --ipc=host --rm -it lvx-megatron:latest \
#       python -m lvx_megatron.torchrun --nproc-per-node=8 pretrain_mllm.py --config examples/configs/llama-3.2-11b-vision.yaml
# Slurm with pyxis/enroot: `enroot import dockerd://lvx-megatron:latest` makes lvx-megatron+latest.sqsh;
# then `CONTAINER_IMAGE=$PWD/lvx-megatron+latest.sqsh sbatch examples/slurm/llama-3.2-11b-vision.sbatch`.
FROM nvcr.io/nvidia/pytorch:25.10-py3

# The NGC image's torch, Transformer Engine and apex stay as they are; the project's other
# dependencies are pinned in requirements/cluster.txt.
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    CUDA_DEVICE_MAX_CONNECTIONS=1

WORKDIR /opt/lvx-megatron
COPY requirements/cluster.txt requirements/cluster.txt
RUN pip install --no-cache-dir -r requirements/cluster.txt

COPY pyproject.toml README.md ./
COPY lvx_megatron lvx_megatron
COPY pretrain_mllm.py ./
COPY examples examples
COPY tools tools
RUN pip install --no-cache-dir --no-deps . \
    && useradd --create-home --uid 1000 --shell /bin/bash lvx \
    && chown -R lvx:lvx /opt/lvx-megatron

USER 1000:1000
CMD ["python", "pretrain_mllm.py", "--help"]
