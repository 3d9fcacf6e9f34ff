"""The public entry point: exact cross-attention over visual tokens sharded across a group."""

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import Tensor

from .auto import choose_for_problem
from .backends import BlockAttentionBackend
from .groups import HierarchicalGroups
from .mask_plan import MaskPlan
from .prepare import CallOptions, prepare_call, resolve_strategy
from .problem import CrossAttentionProblem
from .registry import AUTO, STRATEGIES
from .strategy import Strategy


def call_strategy(
    strategy: str, problem: CrossAttentionProblem, q: Tensor, group: dist.ProcessGroup | HierarchicalGroups | None
) -> Strategy:
    """The :class:`~.strategy.Strategy` a call runs: ``strategy``, or for ``"auto"`` the cost model's
    choice for the call's global shapes (the same on every rank; one rank needs no choice)."""
    if strategy == AUTO:
        one_rank = problem.layout.world_size == 1
        strategy = next(iter(STRATEGIES)) if one_rank else choose_for_problem(problem, q.element_size(), q.device)[0]
    return resolve_strategy(strategy, group)


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
