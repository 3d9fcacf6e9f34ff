"""Exact distributed cross-attention (torch only; never imports megatron)."""

from .api import STRATEGIES, distributed_cross_attention
from .backends import BACKENDS, BlockAttentionBackend, TorchFusedBackend, TorchReferenceBackend, get_backend
from .reference import dense_cross_attention
from .ring import CommStats, count_communication

__all__ = [
    "BACKENDS",
    "STRATEGIES",
    "BlockAttentionBackend",
    "CommStats",
    "TorchFusedBackend",
    "TorchReferenceBackend",
    "count_communication",
    "dense_cross_attention",
    "distributed_cross_attention",
    "get_backend",
]
