"""Block-attention backends and their selection."""

import torch

from .base import BlockAttentionBackend
from .fused import TorchFusedBackend
from .reference import TorchReferenceBackend
from .selecting import ShapeSelectingBackend
from .triton_backend import TritonBackend, triton_unavailable_reason

BACKENDS = ("auto", "torch", "fused", "triton")


def get_backend(
    backend: "str | BlockAttentionBackend", device: torch.device, dtype: torch.dtype
) -> BlockAttentionBackend:
    """Resolve a backend name (or pass an instance through).

    ``"auto"`` on CUDA (fp16/bf16/fp32) chooses per call between our Triton kernels and torch's
    fused kernels (:class:`ShapeSelectingBackend`); elsewhere (CPU, float64) it is the pure-torch
    backend. ``"triton"`` needs CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``.
    """
    if isinstance(backend, BlockAttentionBackend):
        return backend
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or a BlockAttentionBackend, got {backend!r}")
    if backend == "triton":
        reason = triton_unavailable_reason(device)
        if reason is not None:
            raise ValueError(f"backend='triton': {reason}")
        return TritonBackend()
    if backend == "fused" or (
        backend == "auto" and device.type == "cuda" and dtype in (torch.float16, torch.bfloat16, torch.float32)
    ):
        if device.type != "cuda":
            raise ValueError(f"backend='fused' needs CUDA tensors, got device {device}")
        return TorchFusedBackend() if backend == "fused" else ShapeSelectingBackend()
    return TorchReferenceBackend()


__all__ = [
    "BACKENDS",
    "BlockAttentionBackend",
    "ShapeSelectingBackend",
    "TorchFusedBackend",
    "TorchReferenceBackend",
    "TritonBackend",
    "get_backend",
]
