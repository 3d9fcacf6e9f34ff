"""The gated cross-attention decoder layer of Llama-3.2-Vision as a megatron layer.

``h = h + tanh(g_attn) * xattn(norm(h), X)`` then ``h = h + tanh(g_mlp) * mlp(norm(h)) * m``,
where ``m`` zeroes the text rows that see no image (Meta's reference semantics; OpenFlamingo's
gated block has no ``m``). It has the call signature of megatron's ``TransformerLayer`` so a
``TransformerBlock`` can hold it.
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_layer import BaseTransformerLayer, get_transformer_layer_offset
from torch import Tensor

from .context_mask import CrossAttentionMask
from .transformer_config import CrossAttentionTransformerConfig


@dataclass
class GatedCrossAttentionLayerSubmodules:
    """Builders of the gated layer's parts."""

    input_layernorm: ModuleSpec | type
    cross_attention: ModuleSpec | type
    pre_mlp_layernorm: ModuleSpec | type
    mlp: Callable[..., MegatronModule]  # megatron's MLP builder: mlp(config=, pg_collection=, is_mtp_layer=)


class GatedCrossAttentionLayer(MegatronModule, BaseTransformerLayer):
    """Cross-attention + MLP with tanh gates; input and output ``[s, b, h]``.

    ``mask_blind_mlp_rows``: zero the MLP branch of text rows that see no image (Llama-3.2-Vision);
    OpenFlamingo's gated block runs its feed-forward on every row.
    """

    def __init__(
        self,
        config: CrossAttentionTransformerConfig,
        submodules: GatedCrossAttentionLayerSubmodules,
        layer_number: int = 1,
        pg_collection: ProcessGroupCollection | None = None,
        vp_stage: int | None = None,
        mask_blind_mlp_rows: bool = True,
        **kwargs,
    ) -> None:
        super().__init__(config=config)
        self.mask_blind_mlp_rows = mask_blind_mlp_rows
        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups()
        self.pg_collection = pg_collection
        pp_rank = pg_collection.pp.rank() if hasattr(pg_collection, "pp") else 0
        self.layer_number = layer_number + get_transformer_layer_offset(config, vp_stage, pp_rank)
        norm_kwargs = dict(config=config, hidden_size=config.hidden_size, eps=config.layernorm_epsilon)
        self.input_layernorm = build_module(submodules.input_layernorm, **norm_kwargs)
        self.cross_attention = build_module(
            submodules.cross_attention,
            config=config,
            layer_number=self.layer_number,
            pg_collection=pg_collection,
            layer_index=self.layer_number - 1,
        )
        self.pre_mlp_layernorm = build_module(submodules.pre_mlp_layernorm, **norm_kwargs)
        self.mlp = submodules.mlp(config=config, pg_collection=pg_collection, is_mtp_layer=False)
        self.cross_attn_attn_gate = torch.nn.Parameter(
            torch.full((1,), config.cross_attention_gate_init, dtype=config.params_dtype)
        )
        self.cross_attn_mlp_gate = torch.nn.Parameter(
            torch.full((1,), config.cross_attention_gate_init, dtype=config.params_dtype)
        )
        for gate in (self.cross_attn_attn_gate, self.cross_attn_mlp_gate):
            # Under sequence parallelism each TP rank sees other rows: sum the gate grads over TP.
            gate.sequence_parallel = config.sequence_parallel

    def _visible_rows(self, mask: CrossAttentionMask | None, like: Tensor) -> Tensor | None:
        """``[s_local, b, 1]`` 1/0 per text row (this TP rank's rows under sequence parallelism)."""
        rows = None if mask is None else mask.text_rows_visible()
        if rows is None:
            return None
        rows = rows.transpose(0, 1)
        if self.config.sequence_parallel:
            tp = self.pg_collection.tp
            rows = rows.chunk(tp.size(), dim=0)[tp.rank()]
        return rows.unsqueeze(-1).to(like.dtype)

    def _dropout(self, x: Tensor) -> Tensor:
        return F.dropout(x, p=self.config.hidden_dropout, training=self.training)

    def forward(
        self,
        hidden_states: Tensor,
        attention_mask: Tensor | None = None,
        context: Tensor | None = None,
        context_mask: CrossAttentionMask | None = None,
        inference_context=None,
        **kwargs,
    ) -> tuple[Tensor, Tensor | None]:
        """``TransformerLayer``'s call; with ``inference_context`` (generation) ``context`` is needed at
        prefill only (the layer's visual K/V are cached on the context)."""
        if context is None and inference_context is None:
            raise ValueError("GatedCrossAttentionLayer needs context (the visual features X)")
        attn, bias = self.cross_attention(
            self.input_layernorm(hidden_states), context, context_mask, inference_context=inference_context
        )
        if bias is not None:
            attn = attn + bias
        hidden_states = hidden_states + torch.tanh(self.cross_attn_attn_gate) * self._dropout(attn)
        mlp, bias = self.mlp(self.pre_mlp_layernorm(hidden_states))
        if bias is not None:
            mlp = mlp + bias
        visible = self._visible_rows(context_mask, mlp) if self.mask_blind_mlp_rows else None
        if visible is not None:
            mlp = mlp * visible
        hidden_states = hidden_states + torch.tanh(self.cross_attn_mlp_gate) * self._dropout(mlp)
        return hidden_states, context
