"""Query all-gather: every rank attends all text queries to its local visual shard.

Forward: all-gather ``Q`` (and mask rows), partial ``(O, LSE)`` of all queries against the local
K/V, the global LSE from two small all-reduces (max, then sum of ``exp``), each partial ``O``
rescaled by ``exp(LSE_local - LSE_global)`` and reduce-scattered back to the owners.
Backward: all-gather ``Q, dO, LSE, D`` (and mask rows), local ``dQ_all, dK, dV`` with the global
statistics, reduce-scatter of ``dQ``. Same volume as the query ring in a few collectives.
"""

import torch
from torch import Tensor

from .collectives import all_gather_rows, all_reduce_lse, reduce_scatter_rows
from .merge import safe_lse
from .problem import CrossAttentionProblem, output_delta


def combine_partials(
    o: Tensor, lse: Tensor, lens: list[int], rank: int, group, acc: torch.dtype, prefix: str = ""
) -> tuple[Tensor, Tensor]:
    """Merge every rank's partial ``(O, LSE)`` of the same gathered queries; keep this rank's rows.

    The global LSE comes from two small all-reduces; each partial ``O`` is rescaled by
    ``exp(LSE_local - LSE_global)`` and the sum is reduce-scattered to the rows' owners. Returns
    ``(O, LSE)`` of this rank's rows in ``acc``; bytes are counted as ``<prefix>lse``, ``<prefix>o``.
    """
    lse = lse.to(acc)
    lse_global = all_reduce_lse(lse, group, len(lens), f"{prefix}lse")
    weight = torch.exp(lse - safe_lse(lse_global)).unsqueeze(-1)
    o_own = reduce_scatter_rows(o.to(acc) * weight, lens, rank, group, f"{prefix}o")
    start = sum(lens[:rank])
    return o_own, lse_global[:, start : start + lens[rank]].contiguous()


def q_allgather_forward(
    q: Tensor, k: Tensor, v: Tensor, q_mask_rows: Tensor | None, kv_ids: Tensor | None, p: CrossAttentionProblem
) -> tuple[Tensor, Tensor]:
    """Return this rank's ``(out, lse)``."""
    lens, acc, rank = list(p.layout.q_lens), p.acc_dtype, p.rank
    q_all = all_gather_rows(q, lens, p.group, "q")
    rows = None if q_mask_rows is None else all_gather_rows(q_mask_rows, lens, p.group, "q_mask")
    o, lse = p.backend.forward(q_all, k, v, p.mask(rows, kv_ids, q_all.shape[1]), p.scale)
    o_own, lse_own = combine_partials(o, lse, lens, rank, p.group, acc)
    return o_own.to(q.dtype), lse_own


def q_allgather_backward(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    q_mask_rows: Tensor | None,
    kv_ids: Tensor | None,
    p: CrossAttentionProblem,
) -> tuple[Tensor, Tensor, Tensor]:
    """Return ``(dq, dk, dv)``."""
    lens, acc, rank = list(p.layout.q_lens), p.acc_dtype, p.rank
    gather = lambda t, name: all_gather_rows(t, lens, p.group, name)
    q_all, do_all = gather(q, "q"), gather(dout.to(q.dtype), "dout")
    lse_all, delta_all = gather(lse, "lse"), gather(output_delta(dout, out), "delta")
    rows = None if q_mask_rows is None else gather(q_mask_rows, "q_mask")
    mask = p.mask(rows, kv_ids, q_all.shape[1])
    dq_all, dk, dv = p.backend.backward(do_all, q_all, k, v, lse_all, delta_all, mask, p.scale)
    dq = reduce_scatter_rows(dq_all.to(acc), lens, rank, p.group, "dq")
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
