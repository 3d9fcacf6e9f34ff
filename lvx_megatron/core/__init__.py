"""megatron-core integration: context-parallel cross-attention layers and specs."""

from .context_mask import CrossAttentionMask
from .cross_attention import ContextParallelCrossAttention, ContextParallelCrossAttentionSubmodules
from .flamingo_layer import FlamingoBlockSizes, FlamingoLayer, FlamingoLayerSubmodules
from .gated_layer import GatedCrossAttentionLayer, GatedCrossAttentionLayerSubmodules
from .hyper_attention import HyperAttentionLayer, HyperCoreAttention, VisualCrossAttention, hyper_context
from .norm import HeadRMSNorm, LayerNorm, RMSNorm
from .specs import (
    cross_attention_decoder_block_spec,
    cross_attention_layer_spec,
    flamingo_layer_spec,
    hyper_attention_layer_spec,
    self_attention_layer_spec,
)
from .text_attention import TextContextParallelAttention
from .transformer_config import CrossAttentionTransformerConfig, llama_style_config

__all__ = [
    "ContextParallelCrossAttention",
    "ContextParallelCrossAttentionSubmodules",
    "CrossAttentionMask",
    "CrossAttentionTransformerConfig",
    "FlamingoBlockSizes",
    "FlamingoLayer",
    "FlamingoLayerSubmodules",
    "GatedCrossAttentionLayer",
    "GatedCrossAttentionLayerSubmodules",
    "HeadRMSNorm",
    "HyperAttentionLayer",
    "HyperCoreAttention",
    "LayerNorm",
    "RMSNorm",
    "TextContextParallelAttention",
    "VisualCrossAttention",
    "cross_attention_decoder_block_spec",
    "cross_attention_layer_spec",
    "flamingo_layer_spec",
    "hyper_attention_layer_spec",
    "hyper_context",
    "llama_style_config",
    "self_attention_layer_spec",
]
