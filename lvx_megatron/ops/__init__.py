"""Exact distributed cross-attention (torch only; never imports megatron)."""

from .api import distributed_cross_attention, recomputed_kv_cross_attention
from .backends import (
    BACKENDS,
    BlockAttentionBackend,
    TorchFusedBackend,
    TorchReferenceBackend,
    TritonBackend,
    get_backend,
)
from .comm_stats import CommStats, count_communication
from .dense_reference import dense_cross_attention
from .errors import SettingError
from .mask_plan import MaskPlan
from .masks import BlockMask
from .policy import CrossAttentionOp, LinkSettings, SharedComm
from .prepare import CallOptions, prepare_call
from .registry import AUTO, REGISTRY, STRATEGIES, TWO_LEVEL_STRATEGIES
from .settings import SettingFields, check_cross_attention_settings
from .strategy import Strategy

__all__ = [
    "AUTO",
    "BACKENDS",
    "REGISTRY",
    "STRATEGIES",
    "TWO_LEVEL_STRATEGIES",
    "BlockAttentionBackend",
    "BlockMask",
    "CallOptions",
    "CommStats",
    "CrossAttentionOp",
    "LinkSettings",
    "MaskPlan",
    "SettingError",
    "SettingFields",
    "SharedComm",
    "Strategy",
    "TorchFusedBackend",
    "TorchReferenceBackend",
    "TritonBackend",
    "check_cross_attention_settings",
    "count_communication",
    "dense_cross_attention",
    "distributed_cross_attention",
    "get_backend",
    "prepare_call",
    "recomputed_kv_cross_attention",
]
