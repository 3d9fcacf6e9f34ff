"""mPLUG-Owl3's hyper attention (its Hyper Attention Transformer Block) as megatron parts.

In a hyper layer the queries of the layer's own self-attention also attend to the visual tokens,
in parallel with the causal text attention, and a learned gate mixes the two before ``o_proj``
(mPLUG-Owl3-7B-240728, ``modeling_hyper_qwen2.py``)::

    t = norm(h);  x = norm(X)                     # the layer's input RMSNorm, shared by both
    q, k, v = qkv(t) with RoPE on q, k            # the text self-attention's projections
    A_t = causal_attention(q, k, v)               # [s, heads * d]
    K, V = kv_x(x) (own projection, with bias); K rotated by RoPE at the text position of its
           image's <image> token (MI-Rope)
    A_x = attention(q, K, V) over the images the row may see
    A = A_t + m * g * (A_x - A_t),  g = sigmoid(gate)  (gate: a learned vector over heads * d)
    h = h + o_proj(A), then the layer's MLP

``m`` is 1 for rows that see an image and 0 for the others, whose output stays the text
attention's. The visual branch is lvx-megatron's :class:`ContextParallelCrossAttention` (query
ring by default: each CP rank keeps the K/V of its own visual shard, recomputed from the shared
features in backward) fed with the self-attention's queries.

The context the decoder passes to a hyper layer is ``[X, cos, sin]`` (concatenated on the last
dimension, see :func:`hyper_context`): the MI-Rope rotation of each visual token travels with the
features, so the recompute of K/V in backward has it without per-call state. (cos/sin rather than
the angles: an angle of thousands of radians in bf16 is off by whole turns.)
"""

import torch
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.tensor_parallel import ColumnParallelLinear
from megatron.core.tensor_parallel.mappings import copy_to_tensor_model_parallel_region
from megatron.core.transformer.transformer_layer import TransformerLayer
from torch import Tensor

from .context_mask import CrossAttentionMask
from .cross_attention import ContextParallelCrossAttention, ContextParallelCrossAttentionSubmodules
from .norm import RMSNorm
from .text_attention import TextContextParallelAttention
from .transformer_config import CrossAttentionTransformerConfig


def hyper_context(x: Tensor, freqs: Tensor) -> Tensor:
    """The hyper layers' context ``[X, cos, sin]`` from ``X [s_vis, b, h]`` and the MI-Rope angles.

    ``freqs [s_vis, b, head_dim / 2]``: each visual token's RoPE angles (megatron's non-interleaved
    layout repeats them over the two halves of a head).
    """
    freqs = freqs.float()
    return torch.cat([x, freqs.cos().to(x.dtype), freqs.sin().to(x.dtype)], dim=-1)


def rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """RoPE in megatron's non-interleaved layout on the last dimension; ``cos``/``sin`` of half width."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class _PassThrough(torch.nn.Module):
    """Stands in for a linear: the queries come projected (and rotated) by the self-attention, and
    the output is mixed with the text attention's before the layer's own ``o_proj``."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__()

    def forward(self, x: Tensor) -> tuple[Tensor, None]:
        return x, None


class _BiasedColumnParallelLinear(ColumnParallelLinear):
    """The visual K/V projection: mPLUG-Owl3's ``v_kv_proj`` has a bias whatever the decoder's linears have."""

    def __init__(self, *args, bias: bool = True, **kwargs) -> None:
        super().__init__(*args, bias=True, **kwargs)


class VisualCrossAttention(ContextParallelCrossAttention):
    """The visual branch of hyper attention: queries in, ``[s, b, heads_per_rank * d]`` out.

    K/V are ``v_kv_proj(norm(X))`` (the layer's input norm, bound by :meth:`bind_norm`) with K
    rotated by the MI-Rope cos/sin that come with the context (:func:`hyper_context`).
    """

    def __init__(
        self, config: CrossAttentionTransformerConfig, layer_number: int, pg_collection: ProcessGroupCollection
    ) -> None:
        submodules = ContextParallelCrossAttentionSubmodules(
            linear_q=_PassThrough, linear_kv=_BiasedColumnParallelLinear, linear_proj=_PassThrough
        )
        super().__init__(config, submodules, layer_number, pg_collection, layer_index=layer_number - 1)
        self._normalize = None

    def bind_norm(self, norm: RMSNorm) -> None:
        """Normalise the visual features with the layer's input norm (kept as a reference, not a
        submodule: its weight belongs to the layer)."""
        tp_group = self.pg_collection.tp
        self._normalize = lambda x: norm.forward_replicated(x, tp_group)

    def project_kv(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``[X, cos, sin]`` -> ``k, v`` ``[b, s_vis, groups_per_rank, d]`` (X normalised, k rotated)."""
        hidden = self.config.visual_hidden_size
        features = x[..., :hidden]
        cos, sin = x[..., hidden:].detach().unsqueeze(2).chunk(2, dim=-1)
        kv, _ = self.linear_kv(self._normalize(features))
        s, b = kv.shape[:2]
        k, v = kv.view(s, b, self.groups_per_rank, 2 * self.head_dim).split(self.head_dim, dim=-1)
        return rotate(k, cos, sin).transpose(0, 1), v.transpose(0, 1)


class HyperCoreAttention(TextContextParallelAttention):
    """megatron ``core_attention`` of a hyper layer: the text attention (its parent's) and the gated
    visual branch.

    Without visual inputs (set by :class:`HyperAttentionLayer` for each call) it is the plain
    causal text attention. ``hyper_gate`` holds one value per output channel (``heads * head_dim``),
    replicated over TP; each rank uses its heads' slice. ``core_attention_args``: megatron's other
    ``core_attention`` arguments, as the parent takes them.
    """

    def __init__(self, config: CrossAttentionTransformerConfig, layer_number: int, **core_attention_args) -> None:
        pg_collection = core_attention_args.pop("pg_collection", None)
        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp", "cp"])
        super().__init__(config, layer_number, pg_collection=pg_collection, **core_attention_args)
        self.pg_collection = pg_collection
        self.visual_attention = VisualCrossAttention(config, layer_number, pg_collection)
        channels = config.num_attention_heads * config.kv_channels
        self.hyper_gate = torch.nn.Parameter(
            torch.full((channels,), config.cross_attention_gate_init, dtype=config.params_dtype)
        )
        # ([X, cos, sin], mask, inference context) of the current call, consumed within it; set by
        # HyperAttentionLayer.forward.
        self.visual_inputs: tuple[Tensor | None, CrossAttentionMask, object] | None = None

    def _local_gate(self) -> Tensor:
        gate, tp = self.hyper_gate, self.pg_collection.tp
        if tp.size() > 1:  # each rank's slice gets a gradient: sum them over TP in backward
            gate = copy_to_tensor_model_parallel_region(gate, group=tp).chunk(tp.size())[tp.rank()]
        return gate

    def forward(self, query: Tensor, *args, **kwargs) -> Tensor:
        """megatron's ``core_attention`` call (the parent's arguments): the text attention, gated
        towards the visual branch when the layer set visual inputs."""
        text = super().forward(query, *args, **kwargs)
        if self.visual_inputs is None:
            return text
        context, mask, inference_context = self.visual_inputs
        sq, b = query.shape[:2]
        visual, _ = self.visual_attention(query.reshape(sq, b, -1), context, mask, inference_context=inference_context)
        gate = torch.sigmoid(self._local_gate()).to(text.dtype)
        rows = mask.text_rows_visible()
        if rows is None:
            return text + gate * (visual - text)
        rows = rows.transpose(0, 1).unsqueeze(-1).to(text.dtype)  # [sq, b, 1]
        return text + rows * gate * (visual - text)


class HyperAttentionLayer(TransformerLayer):
    """A Qwen2 decoder layer whose self-attention is hyper attention (its ``core_attention`` a
    :class:`HyperCoreAttention`); the visual features go through this layer's input norm too."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.self_attention.core_attention.visual_attention.bind_norm(self.input_layernorm)

    def forward(self, *args, **kwargs):
        """``TransformerLayer``'s call; with ``inference_context`` (generation) ``context`` is needed at
        prefill only (the visual K/V are cached on the context)."""
        context, mask, cache = kwargs.get("context"), kwargs.get("context_mask"), kwargs.get("inference_context")
        if (context is None and cache is None) or mask is None:
            raise ValueError("HyperAttentionLayer needs context ([X, MI-Rope cos, sin]) and context_mask")
        core = self.self_attention.core_attention
        core.visual_inputs = (context, mask, cache)
        try:
            return super().forward(*args, **kwargs)
        finally:
            core.visual_inputs = None
