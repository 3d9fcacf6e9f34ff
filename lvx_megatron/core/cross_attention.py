"""Context-parallel cross-attention as a megatron-core module.

Queries come from the text hidden states, keys and values from the visual features ``X`` that
all cross-attention layers share. Heads are split over tensor parallelism (Column/RowParallel
linears, sequence parallelism on the text side), and the visual tokens over context
parallelism: every CP rank keeps its visual K/V shard and the ops' strategy moves the queries or
the K/V. The module builds its projections from its spec and calls one ops entry, a
:class:`~lvx_megatron.ops.CrossAttentionOp`, which owns the ops policy: the strategy (``"auto"``:
the cost model's choice at the first call), the links and groups it needs, and with
``recompute_visual_kv`` the recompute of ``K = X Wk``, ``V = X Wv`` (and the k-norm) in backward.
"""

import copy
from dataclasses import dataclass

from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.utils import divide
from torch import Tensor

from ..ops import AUTO, CrossAttentionOp
from .context_mask import CrossAttentionMask
from .inference_context import cached_visual_key_value
from .transformer_config import CrossAttentionTransformerConfig


@dataclass
class ContextParallelCrossAttentionSubmodules:
    """Builders (classes or ``ModuleSpec``) of the cross-attention's parts; norms optional."""

    linear_q: ModuleSpec | type
    linear_kv: ModuleSpec | type
    linear_proj: ModuleSpec | type
    q_norm: ModuleSpec | type | None = None  # per head; built with tp_group (see HeadRMSNorm)
    k_norm: ModuleSpec | type | None = None


class ContextParallelCrossAttention(MegatronModule):
    """Gated-layer-ready cross-attention: ``[s, b, h]`` text x ``[s_vis, b, h_vis]`` visual.

    Args:
        config: the model config (``num_query_groups`` for GQA).
        submodules: the linears and optional norms.
        layer_number: 1-based layer number in the whole decoder.
        pg_collection: process groups; ``.tp`` splits heads, ``.cp`` carries the ring.
        layer_index: 0-based decoder index, used to look the strategy up in the config (None:
            ``"auto"``).
    """

    def __init__(
        self,
        config: CrossAttentionTransformerConfig,
        submodules: ContextParallelCrossAttentionSubmodules,
        layer_number: int,
        pg_collection: ProcessGroupCollection | None = None,
        layer_index: int | None = None,
    ) -> None:
        super().__init__(config=config)
        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp", "cp"])
        self.pg_collection = pg_collection
        self.layer_number = layer_number
        tp = pg_collection.tp.size()
        heads, groups = config.num_attention_heads, config.num_query_groups or config.num_attention_heads
        if heads % tp or groups % tp:
            raise ValueError(
                f"num_attention_heads ({heads}) and num_query_groups ({groups}) must be divisible by the "
                f"tensor-model-parallel size ({tp})"
            )
        self.head_dim = config.kv_channels
        self.heads_per_rank = divide(heads, tp)
        self.groups_per_rank = divide(groups, tp)
        strategy = config.strategy_for_layer(layer_index) if layer_index is not None else AUTO
        self.op = CrossAttentionOp(
            strategy,
            config.cross_attention_link_settings(),
            config.cross_attention_shared,
            f"cross-attention layer {layer_number}",
        )

        linear = dict(config=config, bias=config.add_bias_linear, is_expert=False, tp_group=pg_collection.tp)
        column = dict(linear, init_method=config.init_method, gather_output=False, skip_bias_add=False)
        self.linear_q = build_module(
            submodules.linear_q, config.hidden_size, heads * self.head_dim, tp_comm_buffer_name="q", **column
        )
        # X is replicated over TP (it is split over CP, not over the sequence-parallel region),
        # so its projection must not all-gather along the sequence.
        kv_config = copy.copy(config)
        kv_config.sequence_parallel = False
        kv_column = dict(column, config=kv_config)
        self.linear_kv = build_module(
            submodules.linear_kv,
            config.visual_hidden_size,
            2 * groups * self.head_dim,
            tp_comm_buffer_name="kv",
            **kv_column,
        )
        norm_kwargs = dict(
            config=config, hidden_size=self.head_dim, eps=config.layernorm_epsilon, tp_group=pg_collection.tp
        )
        self.q_norm = build_module(submodules.q_norm, **norm_kwargs) if submodules.q_norm else None
        self.k_norm = build_module(submodules.k_norm, **norm_kwargs) if submodules.k_norm else None
        row = dict(linear, init_method=config.output_layer_init_method, input_is_parallel=True, skip_bias_add=True)
        self.linear_proj = build_module(
            submodules.linear_proj, heads * self.head_dim, config.hidden_size, tp_comm_buffer_name="proj", **row
        )

    @property
    def strategy(self) -> str:
        """The ops strategy this layer runs (what ``"auto"`` chose, after the first call)."""
        return self.op.strategy

    def project_kv(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``X`` ``[s_vis, b, h_vis]`` -> ``k, v`` ``[b, s_vis, groups_per_rank, d]`` (k normed)."""
        kv, _ = self.linear_kv(x)
        s, b = kv.shape[:2]
        k, v = kv.view(s, b, self.groups_per_rank, 2 * self.head_dim).split(self.head_dim, dim=-1)
        if self.k_norm is not None:
            k = self.k_norm(k)
        return k.transpose(0, 1), v.transpose(0, 1)

    def forward(
        self,
        hidden_states: Tensor,
        context: Tensor | None,
        context_mask: CrossAttentionMask | None = None,
        inference_context=None,
    ) -> tuple[Tensor, Tensor | None]:
        """Return ``(output [s, b, h], bias)`` like megatron's attention modules.

        With an ``inference_context`` (generation) the visual K/V are projected from ``context`` at
        prefill and read from the context afterwards (``context`` may then be None).
        """
        q, _ = self.linear_q(hidden_states)
        s, b = q.shape[:2]
        q = q.view(s, b, self.heads_per_rank, self.head_dim)
        if self.q_norm is not None:
            q = self.q_norm(q)
        q = q.transpose(0, 1)
        cp = self.pg_collection.cp
        # Models plan the mask once per micro-batch; a mask built by hand is planned here.
        plan = (context_mask or CrossAttentionMask()).planned(cp, q.shape[1]).plan
        x, project, recompute = context, self.project_kv, self.config.recompute_visual_kv
        if inference_context is not None:  # this CP rank's visual K/V, projected once per generation
            kv = cached_visual_key_value(inference_context, self.layer_number, context, self.project_kv)
            x, project, recompute = kv[0], lambda _: kv, False
            kv_shape = tuple(kv[0].shape)
        else:
            kv_shape = (b, context.shape[0], self.groups_per_rank, self.head_dim)
        out = self.op(
            q,
            x,
            project,
            kv_shape,
            group=cp,
            mask_plan=plan,
            softmax_scale=self.config.softmax_scale,
            backend=self.config.cross_attention_backend,
            recompute_kv=recompute,
        )
        out = out.transpose(0, 1).reshape(s, b, self.heads_per_rank * self.head_dim)
        return self.linear_proj(out)
