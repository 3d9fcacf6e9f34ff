"""OpenFlamingo's decoder layer: a gated cross-attention block, then the language model's own layer.

OpenFlamingo wraps every ``cross_attn_every_n_layers``-th decoder layer so that a
``GatedCrossAttentionBlock`` runs on the text first::

    h = h + tanh(a) * to_out(attend(to_q(LN(h)), to_kv(X)))      # masked: see below
    h = h + tanh(f) * W2 gelu(W1 LN(h))                          # every row, no mask
    h = decoder_layer(h)

The block is lvx-megatron's :class:`~.gated_layer.GatedCrossAttentionLayer` (context-parallel
cross-attention, TP-split heads and feed-forward) built with a copy of the decoder's config that
carries the block's own sizes: ``heads`` x ``head_dim`` attention (8 x 64 in OpenFlamingo, whatever
the LM's width) and a ``ff_mult`` x hidden GELU feed-forward, LayerNorms with bias. Each text token
attends only to the latents of its most recent ``<image>`` (the mask comes from the model); rows
before the first image get a zero attention output, as in OpenFlamingo.
"""

import copy
from dataclasses import dataclass

import torch.nn.functional as F
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_layer import BaseTransformerLayer
from torch import Tensor

from .transformer_config import CrossAttentionTransformerConfig


@dataclass(frozen=True)
class FlamingoBlockSizes:
    """The gated block's sizes, whatever the LM's width: ``heads`` x ``head_dim`` attention and a
    ``ff_mult`` x hidden feed-forward (OpenFlamingo: 8, 64, 4)."""

    heads: int = 8
    head_dim: int = 64
    ff_mult: int = 4


OPENFLAMINGO_BLOCK = FlamingoBlockSizes()


def flamingo_block_config(
    config: CrossAttentionTransformerConfig, sizes: FlamingoBlockSizes
) -> CrossAttentionTransformerConfig:
    """The decoder's config with the gated block's attention and feed-forward sizes."""
    block = copy.copy(config)
    block.num_attention_heads = sizes.heads
    block.num_query_groups = sizes.heads
    block.kv_channels = sizes.head_dim
    block.ffn_hidden_size = sizes.ff_mult * config.hidden_size
    block.gated_linear_unit = False
    block.activation_func = F.gelu
    return block


@dataclass
class FlamingoLayerSubmodules:
    """The gated block (a ``GatedCrossAttentionLayer`` spec) and the decoder layer it precedes."""

    gated_cross_attention: ModuleSpec | type
    decoder_layer: ModuleSpec | type


class FlamingoLayer(MegatronModule, BaseTransformerLayer):
    """Gated cross-attention block + decoder layer, with ``TransformerLayer``'s call signature.

    Args:
        config: the decoder's config.
        submodules: the two parts.
        block: the gated block's sizes.
        layer_args: megatron's layer arguments (``layer_number``: 1-based index in this pipeline
            stage, megatron adds the stage offset; ``pg_collection``, ``vp_stage``), for both parts.
    """

    def __init__(
        self,
        config: CrossAttentionTransformerConfig,
        submodules: FlamingoLayerSubmodules,
        block: FlamingoBlockSizes = OPENFLAMINGO_BLOCK,
        **layer_args,
    ) -> None:
        super().__init__(config=config)
        self.gated_cross_attention = build_module(
            submodules.gated_cross_attention,
            config=flamingo_block_config(config, block),
            **layer_args,
        )
        self.decoder_layer = build_module(submodules.decoder_layer, config=config, **layer_args)
        self.layer_number = self.decoder_layer.layer_number  # global, read by TransformerBlock's checkpointing

    def forward(self, hidden_states: Tensor, **layer_args) -> tuple[Tensor, Tensor | None]:
        """megatron's layer call (``layer_args``: ``context``, ``context_mask``, ``attention_mask``,
        ``inference_context``, ...): the gated block reads the visual context (cached on the inference
        context while generating), the decoder layer gets every argument."""
        hidden_states, _ = self.gated_cross_attention(
            hidden_states,
            context=layer_args.get("context"),
            context_mask=layer_args.get("context_mask"),
            inference_context=layer_args.get("inference_context"),
        )
        return self.decoder_layer(hidden_states=hidden_states, **layer_args)
