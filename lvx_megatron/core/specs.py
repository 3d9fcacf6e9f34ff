"""Layer specs and the decoder-block builder of the cross-attention decoders.

A Megatron user builds ``TransformerBlock(config, spec=cross_attention_decoder_block_spec(config))``
and calls it with ``context=X`` (this CP rank's visual features) and
``context_mask=CrossAttentionMask(...)``. Layers listed in ``config.cross_attention_layers`` are
built from the cross-attention spec (mllama: gated context-parallel cross-attention layers;
OpenFlamingo: a gated block before the decoder layer, :func:`flamingo_layer_spec`; mPLUG-Owl3:
hyper-attention layers, :func:`hyper_attention_layer_spec`); the others are causal self-attention
layers whose text is split over CP too.
"""

from functools import partial

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build
from megatron.core.transformer.transformer_layer import (
    TransformerLayer,
    TransformerLayerSubmodules,
    get_transformer_layer_offset,
)

from .cross_attention import ContextParallelCrossAttention, ContextParallelCrossAttentionSubmodules
from .flamingo_layer import OPENFLAMINGO_BLOCK, FlamingoBlockSizes, FlamingoLayer, FlamingoLayerSubmodules
from .gated_layer import GatedCrossAttentionLayer, GatedCrossAttentionLayerSubmodules
from .hyper_attention import HyperAttentionLayer, HyperCoreAttention
from .norm import HeadRMSNorm, LayerNorm, RMSNorm
from .text_attention import TextContextParallelAttention, TextSelfAttention
from .transformer_config import CrossAttentionTransformerConfig


def _mlp_spec():
    """megatron's local dense MLP builder (``MLP.as_mlp_submodule`` with parallel linears)."""
    return partial(
        MLP.as_mlp_submodule, submodules=MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear)
    )


def self_attention_layer_spec(
    module: type = TransformerLayer, core_attention: type = TextContextParallelAttention
) -> ModuleSpec:
    """Causal self-attention layer over CP-split text (local linears, torch attention).

    The q/k/v biases of Qwen2 come from ``config.add_qkv_bias``.
    """
    return ModuleSpec(
        module=module,
        submodules=TransformerLayerSubmodules(
            input_layernorm=RMSNorm,
            self_attention=ModuleSpec(
                module=TextSelfAttention,
                params={"attn_mask_type": AttnMaskType.causal},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=ColumnParallelLinear, core_attention=core_attention, linear_proj=RowParallelLinear
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=RMSNorm,
            mlp=_mlp_spec(),
            mlp_bda=get_bias_dropout_add,
        ),
    )


def cross_attention_layer_spec(qk_norm: bool = True) -> ModuleSpec:
    """Gated context-parallel cross-attention layer (Llama-3.2-Vision has q/k norms)."""
    return ModuleSpec(
        module=GatedCrossAttentionLayer,
        submodules=GatedCrossAttentionLayerSubmodules(
            input_layernorm=RMSNorm,
            cross_attention=ModuleSpec(
                module=ContextParallelCrossAttention,
                submodules=ContextParallelCrossAttentionSubmodules(
                    linear_q=ColumnParallelLinear,
                    linear_kv=ColumnParallelLinear,
                    linear_proj=RowParallelLinear,
                    q_norm=HeadRMSNorm if qk_norm else None,
                    k_norm=HeadRMSNorm if qk_norm else None,
                ),
            ),
            pre_mlp_layernorm=RMSNorm,
            mlp=_mlp_spec(),
        ),
    )


def hyper_attention_layer_spec() -> ModuleSpec:
    """mPLUG-Owl3's hyper-attention layer: the self-attention layer whose core attention also
    attends (gated) to the visual tokens through the context-parallel ops."""
    return self_attention_layer_spec(module=HyperAttentionLayer, core_attention=HyperCoreAttention)


def flamingo_layer_spec(block: FlamingoBlockSizes = OPENFLAMINGO_BLOCK) -> ModuleSpec:
    """OpenFlamingo's gated cross-attention block (LayerNorms with bias, no q/k norms, a GELU
    feed-forward on every row) followed by the self-attention decoder layer."""
    gated = ModuleSpec(
        module=GatedCrossAttentionLayer,
        params={"mask_blind_mlp_rows": False},
        submodules=GatedCrossAttentionLayerSubmodules(
            input_layernorm=LayerNorm,
            cross_attention=ModuleSpec(
                module=ContextParallelCrossAttention,
                submodules=ContextParallelCrossAttentionSubmodules(
                    linear_q=ColumnParallelLinear, linear_kv=ColumnParallelLinear, linear_proj=RowParallelLinear
                ),
            ),
            pre_mlp_layernorm=LayerNorm,
            mlp=_mlp_spec(),
        ),
    )
    return ModuleSpec(
        module=FlamingoLayer,
        params={"block": block},
        submodules=FlamingoLayerSubmodules(gated_cross_attention=gated, decoder_layer=self_attention_layer_spec()),
    )


def cross_attention_decoder_block_spec(
    config: CrossAttentionTransformerConfig,
    pp_rank: int = 0,
    vp_stage: int | None = None,
    self_attention_spec: ModuleSpec | None = None,
    cross_attention_spec: ModuleSpec | None = None,
) -> TransformerBlockSubmodules:
    """The layer specs of this pipeline stage's slice of the decoder.

    Megatron's ``TransformerBlock`` takes a layer list as it is, so the slice is cut here with
    megatron's own offset and layer-count rules.
    """
    self_spec = self_attention_spec or self_attention_layer_spec()
    cross_spec = cross_attention_spec or cross_attention_layer_spec()
    layers = [cross_spec if i in config.cross_attention_layers else self_spec for i in range(config.num_layers)]
    offset = get_transformer_layer_offset(config, vp_stage, pp_rank)
    count = get_num_layers_to_build(config, vp_stage, pp_rank)
    return TransformerBlockSubmodules(layer_specs=layers[offset : offset + count], layer_norm=RMSNorm)
