"""megatron-core integration: context-parallel cross-attention layers and specs."""

from .config import CrossAttentionTransformerConfig, llama_style_config
from .cross_attention import ContextParallelCrossAttention, ContextParallelCrossAttentionSubmodules
from .gated_layer import GatedCrossAttentionLayer, GatedCrossAttentionLayerSubmodules
from .masks import CrossAttentionMask
from .norm import HeadRMSNorm, RMSNorm
from .specs import cross_attention_decoder_block_spec, cross_attention_layer_spec, self_attention_layer_spec
from .text_attention import TextContextParallelAttention

__all__ = [
    "ContextParallelCrossAttention",
    "ContextParallelCrossAttentionSubmodules",
    "CrossAttentionMask",
    "CrossAttentionTransformerConfig",
    "GatedCrossAttentionLayer",
    "GatedCrossAttentionLayerSubmodules",
    "HeadRMSNorm",
    "RMSNorm",
    "TextContextParallelAttention",
    "cross_attention_decoder_block_spec",
    "cross_attention_layer_spec",
    "llama_style_config",
    "self_attention_layer_spec",
]
