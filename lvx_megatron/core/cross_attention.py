"""Context-parallel cross-attention as a megatron-core module.

Queries come from the text hidden states, keys and values from the visual features ``X`` that
all cross-attention layers share. Heads are split over tensor parallelism (Column/RowParallel
linears, sequence parallelism on the text side), and the visual tokens over context
parallelism: every CP rank keeps its visual K/V shard and the ops' query ring (or another
strategy) moves the queries. With ``recompute_visual_kv`` the layer keeps no K/V for backward:
it recomputes ``K = X Wk``, ``V = X Wv`` (and the k-norm) from the shared ``X`` in backward.
"""

import copy
from dataclasses import dataclass

import torch
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.utils import divide
from torch import Tensor

from ..ops import STRATEGIES, Strategy, distributed_cross_attention, prepare_call
from ..ops.api import resolve_strategy
from ..ops.auto import choose_for_call, default_link
from ..ops.cost_model import Link, Topology
from ..ops.groups import HierarchicalGroups, hierarchical_groups
from ..ops.link_probe import probe_link
from ..ops.mask_plan import MaskPlan
from ..ops.problem import CrossAttentionProblem
from .config import CrossAttentionTransformerConfig
from .masks import CrossAttentionMask


@dataclass
class ContextParallelCrossAttentionSubmodules:
    """Builders (classes or ``ModuleSpec``) of the cross-attention's parts; norms optional."""

    linear_q: ModuleSpec | type
    linear_kv: ModuleSpec | type
    linear_proj: ModuleSpec | type
    q_norm: ModuleSpec | type | None = None  # per head; built with tp_group (see HeadRMSNorm)
    k_norm: ModuleSpec | type | None = None


# Per (CP group, ranks per node): made or measured once, shared by every layer. Each is collective
# over the CP group at its first use, which every rank of the group reaches at the same layer.
_TWO_LEVEL_GROUPS: dict[tuple[object, int], HierarchicalGroups] = {}
_PROBED_LINKS: dict[tuple[object, int | None], Link | Topology] = {}


def _two_level_groups(cp_group, ranks_per_node: int) -> HierarchicalGroups:
    """The CP group split into nodes of ``ranks_per_node`` consecutive CP ranks (made once)."""
    key = (cp_group, ranks_per_node)
    if key not in _TWO_LEVEL_GROUPS:
        _TWO_LEVEL_GROUPS[key] = hierarchical_groups(ranks_per_node, cp_group)
    return _TWO_LEVEL_GROUPS[key]


def _probed_links(cp_group, ranks_per_node: int | None) -> Link | Topology:
    """The CP ring's link, or with ``ranks_per_node`` the links inside and between nodes, measured once."""
    key = (cp_group, ranks_per_node)
    if key not in _PROBED_LINKS:
        if ranks_per_node is None:
            _PROBED_LINKS[key] = probe_link(cp_group)
        else:
            groups = _two_level_groups(cp_group, ranks_per_node)
            inner = probe_link(groups.inner, agree_over=cp_group)
            _PROBED_LINKS[key] = Topology(ranks_per_node, inner, probe_link(groups.outer, agree_over=cp_group))
        if torch.distributed.get_rank() == 0:
            print(f"cross-attention links probed: {_describe_links(_PROBED_LINKS[key])}", flush=True)
    return _PROBED_LINKS[key]


def _describe_links(links: Link | Topology) -> str:
    """``"1.4 GB/s, 210 us"``, or the links inside and between nodes."""
    one = lambda link: f"{link.bandwidth / 1e9:.3g} GB/s, {link.latency * 1e6:.3g} us"
    if isinstance(links, Link):
        return one(links)
    return f"inside a node ({links.ranks_per_node} ranks) {one(links.inner)}; between nodes {one(links.outer)}"


def _configured_link(gbps: float | None, latency_us: float | None, cp_group) -> Link:
    """A link from config fields (latency 10 us when only the bandwidth is given), else by backend."""
    if not gbps:
        return default_link(cp_group)
    return Link(bandwidth=gbps * 1e9, latency=(latency_us or 10.0) * 1e-6)


class _RecomputedKVCrossAttention(torch.autograd.Function):
    """Cross-attention whose K/V are recomputed from ``X`` in backward instead of being saved.

    Forward gets ``k``/``v`` computed without autograd and saves only ``q``, ``X`` (shared by
    every layer, so saving it costs nothing extra), the output and the LSE. Backward recomputes
    ``k, v = project_kv(X)`` with autograd, runs the strategy's backward and pushes ``dk, dv``
    through the recomputed graph: the projection weights get their gradients there, and
    ``dX`` is returned.
    """

    @staticmethod
    def forward(ctx, q, x, k, v, problem: CrossAttentionProblem, strategy: Strategy, project_kv):
        out, lse = strategy.forward(q, k, v, problem)
        ctx.problem, ctx.strategy, ctx.project_kv = problem, strategy, project_kv
        ctx.save_for_backward(q, x, out, lse)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, x, out, lse = ctx.saved_tensors
        x_leaf = x.detach().requires_grad_(ctx.needs_input_grad[1])
        with torch.enable_grad():
            k, v = ctx.project_kv(x_leaf)
        dq, dk, dv = ctx.strategy.backward(dout, q, k.detach(), v.detach(), out, lse, ctx.problem)
        if k.requires_grad or v.requires_grad:  # False only when X and the projection are all frozen
            torch.autograd.backward((k, v), (dk, dv))
        return dq, x_leaf.grad, None, None, None, None, None


class ContextParallelCrossAttention(MegatronModule):
    """Gated-layer-ready cross-attention: ``[s, b, h]`` text x ``[s_vis, b, h_vis]`` visual.

    Args:
        config: the model config (``num_query_groups`` for GQA).
        submodules: the linears and optional norms.
        layer_number: 1-based layer number in the whole decoder.
        pg_collection: process groups; ``.tp`` splits heads, ``.cp`` carries the ring.
        strategy: ops strategy (default: the config's for this layer).
        layer_index: 0-based decoder index, used to look the strategy up in the config.
    """

    def __init__(
        self,
        config: CrossAttentionTransformerConfig,
        submodules: ContextParallelCrossAttentionSubmodules,
        layer_number: int,
        pg_collection: ProcessGroupCollection | None = None,
        strategy: str | None = None,
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
        if strategy is None:
            strategy = config.strategy_for_layer(layer_index) if layer_index is not None else "query_ring"
        if strategy not in (*STRATEGIES, "auto", "hierarchical"):
            raise ValueError(
                f"strategy must be 'auto', 'hierarchical' or one of {sorted(STRATEGIES)}, got {strategy!r}"
            )
        if strategy == "hierarchical" and config.cross_attention_ranks_per_node is None:
            raise ValueError("strategy 'hierarchical' needs config.cross_attention_ranks_per_node")
        self.strategy = strategy  # "auto" is replaced by the cost model's choice at the first call

        self.linear_q = build_module(
            submodules.linear_q,
            config.hidden_size,
            heads * self.head_dim,
            config=config,
            init_method=config.init_method,
            gather_output=False,
            bias=config.add_bias_linear,
            skip_bias_add=False,
            is_expert=False,
            tp_comm_buffer_name="q",
            tp_group=pg_collection.tp,
        )
        # X is replicated over TP (it is split over CP, not over the sequence-parallel region),
        # so its projection must not all-gather along the sequence.
        kv_config = copy.copy(config)
        kv_config.sequence_parallel = False
        self.linear_kv = build_module(
            submodules.linear_kv,
            config.visual_hidden_size,
            2 * groups * self.head_dim,
            config=kv_config,
            init_method=config.init_method,
            gather_output=False,
            bias=config.add_bias_linear,
            skip_bias_add=False,
            is_expert=False,
            tp_comm_buffer_name="kv",
            tp_group=pg_collection.tp,
        )
        norm_kwargs = dict(
            config=config, hidden_size=self.head_dim, eps=config.layernorm_epsilon, tp_group=pg_collection.tp
        )
        self.q_norm = build_module(submodules.q_norm, **norm_kwargs) if submodules.q_norm else None
        self.k_norm = build_module(submodules.k_norm, **norm_kwargs) if submodules.k_norm else None
        self.linear_proj = build_module(
            submodules.linear_proj,
            heads * self.head_dim,
            config.hidden_size,
            config=config,
            init_method=config.output_layer_init_method,
            bias=config.add_bias_linear,
            input_is_parallel=True,
            skip_bias_add=True,
            is_expert=False,
            tp_comm_buffer_name="proj",
            tp_group=pg_collection.tp,
        )

    def project_kv(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``X`` ``[s_vis, b, h_vis]`` -> ``k, v`` ``[b, s_vis, groups_per_rank, d]`` (k normed)."""
        kv, _ = self.linear_kv(x)
        s, b = kv.shape[:2]
        k, v = kv.view(s, b, self.groups_per_rank, 2 * self.head_dim).split(self.head_dim, dim=-1)
        if self.k_norm is not None:
            k = self.k_norm(k)
        return k.transpose(0, 1), v.transpose(0, 1)

    def forward(
        self, hidden_states: Tensor, context: Tensor, context_mask: CrossAttentionMask | None = None
    ) -> tuple[Tensor, Tensor | None]:
        """Return ``(output [s, b, h], bias)`` like megatron's attention modules."""
        q, _ = self.linear_q(hidden_states)
        s, b = q.shape[:2]
        q = q.view(s, b, self.heads_per_rank, self.head_dim)
        if self.q_norm is not None:
            q = self.q_norm(q)
        q = q.transpose(0, 1)
        # Models plan the mask once per micro-batch; a mask built by hand is planned here.
        plan = (context_mask or CrossAttentionMask()).planned(self.pg_collection.cp, q.shape[1]).plan
        if self.strategy == "auto":
            self._choose_strategy(q, context, plan)
        group = self.pg_collection.cp
        if self.strategy == "hierarchical":
            group = _two_level_groups(group, self.config.cross_attention_ranks_per_node)
        kwargs = dict(
            group=group,
            strategy=self.strategy,
            softmax_scale=self.config.softmax_scale,
            mask_plan=plan,
            backend=self.config.cross_attention_backend,
        )
        if self.config.recompute_visual_kv:
            out = self._recomputed_attention(q, context, kwargs)
        else:
            k, v = self.project_kv(context)
            out = distributed_cross_attention(q, k, v, **kwargs)
        out = out.transpose(0, 1).reshape(s, b, self.heads_per_rank * self.head_dim)
        return self.linear_proj(out)

    def _choose_strategy(self, q: Tensor, context: Tensor, plan: MaskPlan | None) -> None:
        """Replace ``"auto"`` by the cost model's fastest strategy for this call's shapes, and log it."""
        kv_shape = (q.shape[0], context.shape[0], self.groups_per_rank, self.head_dim)
        self.strategy, predictions = choose_for_call(
            q, kv_shape, group=self.pg_collection.cp, mask_plan=plan, link=self._links()
        )
        if torch.distributed.is_initialized() and torch.distributed.get_rank() == 0:
            times = ", ".join(f"{n} {p.total_s * 1e3:.3g}" for n, p in predictions.items())
            print(
                f"cross-attention layer {self.layer_number}: auto chose {self.strategy} "
                f"(predicted fwd+bwd ms: {times})",
                flush=True,
            )

    def _links(self) -> Link | Topology:
        """What ``"auto"`` assumes of the CP group: one link, or a :class:`Topology` with ranks per node."""
        cfg, cp = self.config, self.pg_collection.cp
        per_node = cfg.cross_attention_ranks_per_node
        if cfg.cross_attention_link == "probe":
            return _probed_links(cp, per_node)
        link = _configured_link(cfg.cross_attention_link_gbps, cfg.cross_attention_link_latency_us, cp)
        if per_node is None:
            return link
        inner = _configured_link(cfg.cross_attention_inner_link_gbps, cfg.cross_attention_inner_link_latency_us, cp)
        return Topology(per_node, inner=inner, outer=link)

    def _recomputed_attention(self, q: Tensor, x: Tensor, kwargs: dict) -> Tensor:
        with torch.no_grad():
            k, v = self.project_kv(x)
        problem = prepare_call(q, k, v, **kwargs)
        strategy = resolve_strategy(self.strategy, kwargs["group"])
        return _RecomputedKVCrossAttention.apply(q, x, k, v, problem, strategy, self.project_kv)
