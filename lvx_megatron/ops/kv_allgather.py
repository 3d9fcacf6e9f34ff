"""KV all-gather: every rank gathers the whole visual K/V. Only sensible when it is small.

Forward: all-gather ``K, V``, local attention of this rank's queries (the plan holds every rank's ids).
Backward: all-gather again (nothing K/V-sized is kept), local ``dQ`` and ``dK_all, dV_all``,
reduce-scatter of ``dK, dV`` (fp32) back to their owners.
"""

from torch import Tensor

from .collectives import all_gather_rows, reduce_scatter_rows
from .cost_model import CallShape, ComputeModel, Link, kv_bytes
from .problem import ALL, CrossAttentionProblem, output_delta
from .strategy import Strategy


def _gather_kv(k: Tensor, v: Tensor, p: CrossAttentionProblem) -> tuple[Tensor, Tensor]:
    lens = list(p.layout.kv_lens)
    return all_gather_rows(k, lens, p.group, "k"), all_gather_rows(v, lens, p.group, "v")


def kv_allgather_forward(q: Tensor, k: Tensor, v: Tensor, p: CrossAttentionProblem) -> tuple[Tensor, Tensor]:
    """Return this rank's ``(out, lse)``."""
    k_all, v_all = _gather_kv(k, v, p)
    o, lse = p.backend.forward(q, k_all, v_all, p.mask(p.rank, ALL), p.scale)
    return o.to(q.dtype), lse.to(p.acc_dtype)


def kv_allgather_backward(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, p: CrossAttentionProblem
) -> tuple[Tensor, Tensor, Tensor]:
    """Return ``(dq, dk, dv)``."""
    k_all, v_all = _gather_kv(k, v, p)
    dq, dk_all, dv_all = p.backend.backward(
        dout.to(q.dtype), q, k_all, v_all, lse, output_delta(dout, out), p.mask(p.rank, ALL), p.scale
    )
    lens, rank = list(p.layout.kv_lens), p.rank
    dk = reduce_scatter_rows(dk_all.to(p.acc_dtype), lens, rank, p.group, "dk")
    dv = reduce_scatter_rows(dv_all.to(p.acc_dtype), lens, rank, p.group, "dv")
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def kv_allgather_bytes(s: CallShape, rank: int, ranks_per_node: int | None = None) -> tuple[int, int]:
    """``(forward, backward)`` bytes ``rank`` sends: its K/V to every rank (twice), the K/V gradients."""
    n = s.world_size
    gather = (n - 1) * 2 * kv_bytes(s, s.kv_lens[rank], s.elem_bytes)
    return gather, gather + (n - 1) * 2 * kv_bytes(s, max(s.kv_lens), s.acc_bytes)


def kv_allgather_seconds(
    s: CallShape, link: Link, compute: ComputeModel, rank: int, nbytes: tuple[int, int]
) -> tuple[float, float]:
    """``(forward, backward)`` seconds: the local queries against every key, after the collectives
    (not overlapped)."""
    n, sq, total_kv = s.world_size, max(s.q_lens), sum(s.kv_lens)
    fwd_s = compute.seconds(s, sq, total_kv, False) + link.seconds(nbytes[0], 2 * (n - 1))
    bwd_s = compute.seconds(s, sq, total_kv, True) + link.seconds(nbytes[1], 4 * (n - 1))
    return fwd_s, bwd_s


def kv_allgather_peak_kv_bytes(s: CallShape) -> int:
    """Every rank's K and V, gathered."""
    return 2 * kv_bytes(s, sum(s.kv_lens), s.elem_bytes)


STRATEGY = Strategy(
    "kv_allgather",
    kv_allgather_forward,
    kv_allgather_backward,
    kv_allgather_bytes,
    kv_allgather_seconds,
    peak_kv_bytes=kv_allgather_peak_kv_bytes,
)
