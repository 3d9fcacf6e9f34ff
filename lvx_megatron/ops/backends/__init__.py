"""Block-attention backends and their registry."""

from .base import BlockAttentionBackend
from .fused import TorchFusedBackend
from .reference import TorchReferenceBackend
from .registry import BACKEND_FACTORIES, BACKENDS, check_backend_name, get_backend
from .selecting import ShapeSelectingBackend
from .triton_backend import TritonBackend

__all__ = [
    "BACKENDS",
    "BACKEND_FACTORIES",
    "BlockAttentionBackend",
    "ShapeSelectingBackend",
    "TorchFusedBackend",
    "TorchReferenceBackend",
    "TritonBackend",
    "check_backend_name",
    "get_backend",
]
