"""The public entry point: exact cross-attention over visual tokens sharded across a group."""

from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial

import torch
import torch.distributed as dist
from torch import Tensor

from .backends import BlockAttentionBackend, get_backend
from .groups import HierarchicalGroups, check_hierarchical_groups, rank_and_size
from .head_chunks import head_chunk_count
from .mask_plan import MaskPlan
from .problem import CrossAttentionProblem
from .registry import AUTO, REGISTRY, STRATEGIES, TWO_LEVEL_STRATEGIES
from .shard_layout import exchange_layout
from .strategy import Strategy

_FLOAT_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


def _check_inputs(q: Tensor, k: Tensor, v: Tensor, strategy: str, head_chunks: int | None) -> None:
    """Raise ValueError naming the offending argument."""
    if strategy != AUTO and strategy not in REGISTRY:
        raise ValueError(
            f"strategy must be {AUTO!r} or one of {sorted(STRATEGIES)} (or, with group=HierarchicalGroups, "
            f"{sorted(TWO_LEVEL_STRATEGIES)}), got {strategy!r}"
        )
    if head_chunks is not None and (
        isinstance(head_chunks, bool) or not isinstance(head_chunks, int) or head_chunks < 1
    ):
        raise ValueError(f"head_chunks must be None or a positive int, got {head_chunks!r}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor) or t.dim() != 4:
            shape = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"{name} must be a 4-D tensor [B, S_local, H, D], got {shape}")
        if t.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"{name} must have a floating dtype in {_FLOAT_DTYPES}, got {t.dtype}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got k {tuple(k.shape)} and v {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k and v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k and v must be on one device, got {q.device}, {k.device}, {v.device}")
    if q.shape[0] != k.shape[0]:
        raise ValueError(f"q and k must have the same batch size, got {q.shape[0]} and {k.shape[0]}")
    if q.shape[3] != k.shape[3]:
        raise ValueError(f"q and k must have the same head dim, got {q.shape[3]} and {k.shape[3]}")
    hq, hkv = q.shape[2], k.shape[2]
    if hkv == 0 or hq % hkv != 0:
        raise ValueError(f"the query heads of q ({hq}) must be a multiple of the key/value heads of k ({hkv})")


def _got(mask: object) -> str:
    """How an error message names a mask argument: dtype and shape, or the type of a non-tensor."""
    return f"{mask.dtype} {tuple(mask.shape)}" if isinstance(mask, Tensor) else type(mask).__name__


def _check_mask_shapes(q: Tensor, k: Tensor, q_image_mask: Tensor | None, kv_image_ids: Tensor | None) -> None:
    """Raise ValueError when the raw mask tensors do not fit ``q`` and ``k`` (this rank)."""
    b, sq, skv = q.shape[0], q.shape[1], k.shape[1]
    if q_image_mask is not None:
        if kv_image_ids is None:
            raise ValueError("q_image_mask needs kv_image_ids (the image id of each visual token)")
        if (
            not isinstance(q_image_mask, Tensor)
            or q_image_mask.dtype != torch.bool
            or q_image_mask.dim() != 3
            or tuple(q_image_mask.shape[:2]) != (b, sq)
        ):
            raise ValueError(
                f"q_image_mask must be a bool tensor [B={b}, Sq_local={sq}, N_ids], got {_got(q_image_mask)}"
            )
        if q_image_mask.device != q.device:
            raise ValueError(f"q_image_mask must be on {q.device}, got {q_image_mask.device}")
    if kv_image_ids is not None:
        if (
            not isinstance(kv_image_ids, Tensor)
            or kv_image_ids.dtype.is_floating_point
            or kv_image_ids.dtype == torch.bool
            or tuple(kv_image_ids.shape) != (b, skv)
        ):
            raise ValueError(
                f"kv_image_ids must be an integer tensor [B={b}, Skv_local={skv}], got {_got(kv_image_ids)}"
            )
        if kv_image_ids.device != k.device:
            raise ValueError(f"kv_image_ids must be on {k.device}, got {kv_image_ids.device}")


def _check_plan(plan: MaskPlan, q: Tensor, world_size: int) -> None:
    """Raise ValueError when ``plan`` cannot belong to this call (the same answer on every rank)."""
    if not isinstance(plan, MaskPlan):
        raise ValueError(f"mask_plan must be a MaskPlan (lvx_megatron.ops.MaskPlan.build), got {type(plan).__name__}")
    if plan.layout.world_size != world_size:
        raise ValueError(f"mask_plan was built over {plan.layout.world_size} ranks, the group has {world_size}")
    if plan.batch != q.shape[0]:
        raise ValueError(f"mask_plan holds a batch of {plan.batch}, q has {q.shape[0]}")
    if plan.kv_image_ids.device != q.device:
        raise ValueError(f"mask_plan must be on {q.device}, got {plan.kv_image_ids.device}")


def resolve_strategy(strategy: str, group: dist.ProcessGroup | HierarchicalGroups | None) -> Strategy:
    """The registered :class:`~.strategy.Strategy` to run for ``strategy`` and ``group`` (two-level
    ones with their passes bound to the groups)."""
    s = REGISTRY[strategy]
    if not s.two_level:
        return s
    if not isinstance(group, HierarchicalGroups):
        raise ValueError(
            f"strategy={strategy!r} needs group=HierarchicalGroups(inner, outer, ...) "
            f"(see lvx_megatron.ops.groups.hierarchical_groups), got group={group!r}"
        )
    return replace(s, forward=partial(s.forward, groups=group), backward=partial(s.backward, groups=group))


def call_strategy(
    strategy: str, problem: CrossAttentionProblem, q: Tensor, group: dist.ProcessGroup | HierarchicalGroups | None
) -> Strategy:
    """The :class:`~.strategy.Strategy` a call runs: ``strategy``, or for ``"auto"`` the cost model's
    choice for the call's global shapes (the same on every rank; one rank needs no choice)."""
    if strategy == AUTO:
        from .auto import choose_for_problem  # auto imports this module

        one_rank = problem.layout.world_size == 1
        strategy = next(iter(STRATEGIES)) if one_rank else choose_for_problem(problem, q.element_size(), q.device)[0]
    return resolve_strategy(strategy, group)


@dataclass(frozen=True)
class CallOptions:
    """The arguments of :func:`distributed_cross_attention` after its tensors (documented there)."""

    group: dist.ProcessGroup | HierarchicalGroups | None = None
    strategy: str = AUTO
    softmax_scale: float | None = None
    q_image_mask: Tensor | None = None
    kv_image_ids: Tensor | None = None
    mask_plan: MaskPlan | None = None
    backend: str | BlockAttentionBackend = "auto"
    head_chunks: int | None = None


def prepare_call(q: Tensor, k: Tensor, v: Tensor, options: CallOptions) -> CrossAttentionProblem:
    """Validate a call of :func:`distributed_cross_attention` (its tensors and ``options``); the
    problem its strategy runs.

    With ``mask_plan`` the shard layout comes from the plan and the cross-rank check of the call's
    shapes runs once per plan and shape, so a layer's call costs no host synchronisation. ``k``/``v``
    only need the right shape, dtype and device here (callers that compute them later, e.g. under
    recompute, may pass empty tensors of that shape).
    """
    group, mask_plan = options.group, options.mask_plan
    _check_inputs(q, k, v, options.strategy, options.head_chunks)
    groups = group if isinstance(group, HierarchicalGroups) else None
    if options.strategy != AUTO:
        resolve_strategy(options.strategy, group)  # raises for a two-level strategy without HierarchicalGroups
    if groups is not None:
        group = groups.parent  # the flat, node-major group: shard layout, and other strategies run on it
    if options.softmax_scale is not None and not options.softmax_scale > 0:
        raise ValueError(f"softmax_scale must be a positive number, got {options.softmax_scale}")
    distributed, rank, world_size = rank_and_size(group)
    if groups is not None:
        check_hierarchical_groups(groups, rank, world_size)
    if mask_plan is not None and (options.q_image_mask is not None or options.kv_image_ids is not None):
        raise ValueError("give either mask_plan or q_image_mask/kv_image_ids, not both")
    _check_mask_shapes(q, k, options.q_image_mask, options.kv_image_ids)
    if options.kv_image_ids is not None:
        mask_plan = MaskPlan.build(options.q_image_mask, options.kv_image_ids, group, num_queries=q.shape[1])
    if mask_plan is None:
        layout = exchange_layout(q, k, group, world_size, options.head_chunks)
    else:
        _check_plan(mask_plan, q, world_size)
        layout = mask_plan.layout
        if (q.shape[1], k.shape[1]) != (layout.q_lens[rank], layout.kv_lens[rank]):
            raise ValueError(
                f"mask_plan does not fit this call: it holds Sq_local {layout.q_lens[rank]} and Skv_local "
                f"{layout.kv_lens[rank]} for rank {rank}, q and k have {q.shape[1]} and {k.shape[1]}"
            )
        signature = (q.shape[2], q.shape[3], k.shape[2], q.dtype, options.head_chunks)
        if signature not in mask_plan.verified_calls:
            exchange_layout(q, k, group, world_size, options.head_chunks)  # heads, dims, dtype agree on every rank
            mask_plan.verified_calls.add(signature)
    gathered_q_bytes = q.shape[0] * sum(layout.q_lens) * q.shape[2] * q.shape[3] * q.element_size()
    ranks = tuple(slice(r, r + 1) for r in range(world_size))
    return CrossAttentionProblem(
        group=group if distributed else None,
        rank=rank,
        layout=layout,
        batch=q.shape[0],
        q_heads=q.shape[2],
        kv_heads=k.shape[2],
        head_dim=q.shape[3],
        dtype=q.dtype,
        scale=q.shape[3] ** -0.5 if options.softmax_scale is None else float(options.softmax_scale),
        backend=get_backend(options.backend, q.device, q.dtype),
        head_chunks=head_chunk_count(options.head_chunks, k.shape[2], gathered_q_bytes),
        plan=mask_plan,
        q_blocks=ranks,
        kv_blocks=ranks,
    )


class DistributedCrossAttentionFunction(torch.autograd.Function):
    """Autograd wrapper of a :class:`Strategy`: saves ``q, k, v, out, lse`` (the mask is in the problem)."""

    @staticmethod
    def forward(ctx, q, k, v, problem: CrossAttentionProblem, strategy: Strategy):
        out, lse = strategy.forward(q, k, v, problem)
        ctx.problem, ctx.strategy = problem, strategy
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = ctx.strategy.backward(dout, q, k, v, out, lse, ctx.problem)
        return dq, dk, dv, None, None


def distributed_cross_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    group: dist.ProcessGroup | HierarchicalGroups | None = None,
    strategy: str = AUTO,
    softmax_scale: float | None = None,
    q_image_mask: Tensor | None = None,
    kv_image_ids: Tensor | None = None,
    mask_plan: MaskPlan | None = None,
    backend: str | BlockAttentionBackend = "auto",
    head_chunks: int | None = None,
) -> Tensor:
    """Exact softmax cross-attention of text queries against visual keys/values sharded over ``group``.

    Args:
        q: ``[B, Sq_local, Hq, D]`` this rank's text queries.
        k, v: ``[B, Skv_local, Hkv, D]`` this rank's visual keys/values; ``Hq % Hkv == 0``. Shard
            lengths may differ between ranks, and may be zero.
        group: the context-parallel group; None means a single process (or, when
            ``torch.distributed`` is initialised, the default group). A
            :class:`~.groups.HierarchicalGroups` for ``strategy="hierarchical"`` (other strategies
            then run over its parent group).
        strategy: ``"auto"`` (the cost model's fastest for this call's global shapes and the
            group's backend: :func:`~.auto.choose_for_problem`; the query ring on one rank),
            ``"query_ring"`` (LV-XAttn: queries travel, K/V stay) or ``"kv_ring"`` (Ring
            Attention: K/V travel), ``"q_allgather"``, ``"kv_allgather"``, or ``"hierarchical"``
            (``q_allgather`` inside a node, the query ring across nodes; needs
            ``group=HierarchicalGroups``).
        softmax_scale: defaults to ``D ** -0.5``.
        q_image_mask: ``[B, Sq_local, N_ids]`` bool, which image ids each text token may see.
        kv_image_ids: ``[B, Skv_local]`` int, image (or tile) id of each visual token, ``-1`` for
            padding (never attended). Given these, the call gathers every rank's mask itself
            (a collective and a host synchronisation per call); models call
            :meth:`~.mask_plan.MaskPlan.build` once per micro-batch and pass ``mask_plan`` instead.
        mask_plan: the mask of this micro-batch over ``group`` (instead of ``q_image_mask`` and
            ``kv_image_ids``), reused by every layer.
        backend: block-attention backend: ``"auto"``, ``"torch"``, ``"fused"``, ``"triton"`` or an instance.
        head_chunks: ``"q_allgather"`` only: pipeline its collectives over this many chunks of
            whole K/V-head groups (at most ``Hkv``; 1: no chunking; None: by size, see
            :mod:`.head_chunks`). The same on every rank.

    Returns:
        ``[B, Sq_local, Hq, D]``: this rank's rows of the exact attention of the full Q against
        the full K/V. Rows that see no visual token are exactly zero, with zero gradients.
    """
    options = CallOptions(group, strategy, softmax_scale, q_image_mask, kv_image_ids, mask_plan, backend, head_chunks)
    problem = prepare_call(q, k, v, options)
    return DistributedCrossAttentionFunction.apply(q, k, v, problem, call_strategy(strategy, problem, q, group))


class RecomputedKVCrossAttentionFunction(torch.autograd.Function):
    """Cross-attention whose K/V are recomputed from ``X`` in backward instead of being saved.

    Forward gets ``k``/``v`` computed without autograd and saves only ``q``, ``X`` (shared by
    every layer of a model, so saving it costs nothing extra), the output and the LSE. Backward
    recomputes ``k, v = kv_projection(X)`` with autograd, runs the strategy's backward and pushes
    ``dk, dv`` through the recomputed graph: the projection's parameters get their gradients
    there, and ``dX`` is returned.
    """

    @staticmethod
    def forward(ctx, q, x, k, v, problem: CrossAttentionProblem, strategy: Strategy, kv_projection):
        out, lse = strategy.forward(q, k, v, problem)
        ctx.problem, ctx.strategy, ctx.kv_projection = problem, strategy, kv_projection
        ctx.save_for_backward(q, x, out, lse)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, x, out, lse = ctx.saved_tensors
        x_leaf = x.detach().requires_grad_(ctx.needs_input_grad[1])
        with torch.enable_grad():
            k, v = ctx.kv_projection(x_leaf)
        dq, dk, dv = ctx.strategy.backward(dout, q, k.detach(), v.detach(), out, lse, ctx.problem)
        if k.requires_grad or v.requires_grad:  # False only when X and the projection are all frozen
            torch.autograd.backward((k, v), (dk, dv))
        return dq, x_leaf.grad, None, None, None, None, None


def recomputed_kv_cross_attention(
    q: Tensor,
    x: Tensor,
    kv_projection: Callable[[Tensor], tuple[Tensor, Tensor]],
    *,
    group: dist.ProcessGroup | HierarchicalGroups | None = None,
    strategy: str = AUTO,
    softmax_scale: float | None = None,
    mask_plan: MaskPlan | None = None,
    backend: str | BlockAttentionBackend = "auto",
    head_chunks: int | None = None,
) -> Tensor:
    """:func:`distributed_cross_attention` of ``q`` against ``k, v = kv_projection(x)``, keeping no
    K/V for backward: backward projects ``x`` again (exact gradients for ``q``, ``x`` and the
    projection's parameters; less memory when ``x`` is kept anyway, as the visual features shared
    by every cross-attention layer are).

    ``kv_projection`` maps ``x`` to ``k, v`` ``[B, Skv_local, Hkv, D]``; it runs without autograd
    in forward and with it in backward, so it must compute the same both times (no dropout).
    The other arguments are :func:`distributed_cross_attention`'s.
    """
    with torch.no_grad():
        k, v = kv_projection(x)
    options = CallOptions(group, strategy, softmax_scale, mask_plan=mask_plan, backend=backend, head_chunks=head_chunks)
    problem = prepare_call(q, k, v, options)
    return RecomputedKVCrossAttentionFunction.apply(
        q, x, k, v, problem, call_strategy(strategy, problem, q, group), kv_projection
    )
