"""KV all-gather: every rank gathers the whole visual K/V. Only sensible when it is small.

Forward: all-gather ``K, V`` (and image ids), local attention of this rank's queries.
Backward: all-gather again (nothing K/V-sized is kept), local ``dQ`` and ``dK_all, dV_all``,
reduce-scatter of ``dK, dV`` (fp32) back to their owners.
"""

from torch import Tensor

from .collectives import all_gather_rows, reduce_scatter_rows
from .problem import CrossAttentionProblem, output_delta


def _gather_kv(k: Tensor, v: Tensor, kv_ids: Tensor | None, p: CrossAttentionProblem):
    lens = list(p.layout.kv_lens)
    gather = lambda t, name: all_gather_rows(t, lens, p.group, name)
    return gather(k, "k"), gather(v, "v"), None if kv_ids is None else gather(kv_ids, "kv_ids")


def kv_allgather_forward(
    q: Tensor, k: Tensor, v: Tensor, q_mask_rows: Tensor | None, kv_ids: Tensor | None, p: CrossAttentionProblem
) -> tuple[Tensor, Tensor]:
    """Return this rank's ``(out, lse)``."""
    k_all, v_all, ids_all = _gather_kv(k, v, kv_ids, p)
    o, lse = p.backend.forward(q, k_all, v_all, p.mask(q_mask_rows, ids_all, q.shape[1]), p.scale)
    return o.to(q.dtype), lse.to(p.acc_dtype)


def kv_allgather_backward(
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
    k_all, v_all, ids_all = _gather_kv(k, v, kv_ids, p)
    mask = p.mask(q_mask_rows, ids_all, q.shape[1])
    dq, dk_all, dv_all = p.backend.backward(
        dout.to(q.dtype), q, k_all, v_all, lse, output_delta(dout, out), mask, p.scale
    )
    lens, rank = list(p.layout.kv_lens), p.rank
    dk = reduce_scatter_rows(dk_all.to(p.acc_dtype), lens, rank, p.group, "dk")
    dv = reduce_scatter_rows(dv_all.to(p.acc_dtype), lens, rank, p.group, "dv")
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
