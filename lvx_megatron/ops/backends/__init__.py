"""Block-attention backends and their selection."""

import torch

from .base import BlockAttentionBackend
from .fused import TorchFusedBackend
from .reference import TorchReferenceBackend

BACKENDS = ("auto", "torch", "fused")


def get_backend(
    backend: "str | BlockAttentionBackend", device: torch.device, dtype: torch.dtype
) -> BlockAttentionBackend:
    """Resolve a backend name (or pass an instance through).

    ``"auto"`` takes the fused CUDA kernels for fp16/bf16/fp32 CUDA tensors and the pure-torch
    backend everywhere else (CPU, float64).
    """
    if isinstance(backend, BlockAttentionBackend):
        return backend
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or a BlockAttentionBackend, got {backend!r}")
    if backend == "fused" or (
        backend == "auto" and device.type == "cuda" and dtype in (torch.float16, torch.bfloat16, torch.float32)
    ):
        if device.type != "cuda":
            raise ValueError(f"backend='fused' needs CUDA tensors, got device {device}")
        return TorchFusedBackend()
    return TorchReferenceBackend()


__all__ = ["BACKENDS", "BlockAttentionBackend", "TorchFusedBackend", "TorchReferenceBackend", "get_backend"]
