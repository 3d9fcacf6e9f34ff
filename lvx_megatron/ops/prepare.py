"""A call of the public API validated and turned into the problem its strategy runs: its tensors,
its options, the shard layout of every rank (from the mask plan, or exchanged)."""

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
from .registry import AUTO, REGISTRY
from .settings import check_registered_strategy
from .shard_layout import exchange_layout
from .strategy import Strategy

_FLOAT_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


def _check_inputs(q: Tensor, k: Tensor, v: Tensor, strategy: str, head_chunks: int | None) -> None:
    """Raise ValueError naming the offending argument."""
    check_registered_strategy(strategy, "strategy", "group=HierarchicalGroups")
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
