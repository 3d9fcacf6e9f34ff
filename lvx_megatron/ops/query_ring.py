"""Query ring (LV-XAttn): visual K/V stay on their rank; query blocks and partial outputs travel.

Forward: the payload is ``Q_j``; the carry is the running ``(O_j, LSE_j)``, merged on every rank
and delivered to its owner by the last hop.
Backward: the payload is ``(Q_j, dO_j, LSE_j, D_j)``; the carry is the running ``dQ_j`` (fp32);
``dK``/``dV`` of the local shard accumulate locally and never travel. The mask never travels:
every rank's plan (:class:`~.mask_plan.MaskPlan`) holds every block's mask rows.
"""

from torch import Tensor

from .cost_model import CallShape, ComputeModel, Link, q_bytes, ring_bytes, ring_seconds, stat_bytes
from .merge import merge_partials
from .problem import CrossAttentionProblem, accumulate, output_delta
from .ring import Ring
from .ring_pass import ring_pass
from .strategy import Strategy


def query_ring_forward(q: Tensor, k: Tensor, v: Tensor, p: CrossAttentionProblem) -> tuple[Tensor, Tensor]:
    """Return this rank's ``(out, lse)``: ``out`` in ``q``'s dtype, ``lse`` ``[B, Sq, Hq]`` fp32."""
    acc = p.acc_dtype
    if p.layout.world_size == 1:  # nothing to merge: the block kernel's result as it is
        o, lse = p.backend.forward(q, k, v, p.mask(0, 0), p.scale)
        return o.to(q.dtype), lse.to(acc)

    def compute(j: int, payload: list[Tensor]) -> list[Tensor]:
        o, lse = p.backend.forward(payload[0], k, v, p.mask(j, p.rank), p.scale)
        return [o.to(acc), lse.to(acc)]

    def combine(carry: list[Tensor], part: list[Tensor]) -> list[Tensor]:
        return list(merge_partials(carry[0], carry[1], part[0], part[1]))

    carry_specs = lambda j: [p.q_spec(j, acc), p.stat_spec(j)]
    o, lse = ring_pass(Ring(p.group, q.device), [q], lambda j: [p.q_spec(j)], compute, combine, carry_specs)
    return o.to(q.dtype), lse


def query_ring_backward(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor | None,
    lse: Tensor,
    p: CrossAttentionProblem,
    delta: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Return ``(dq, dk, dv)`` in the inputs' dtypes.

    ``delta`` (``rowsum(dO * O)``) may be given instead of being formed from ``out`` (which is then
    unused): callers that hold the rows of several ranks already have it.
    """
    acc = p.acc_dtype
    local: dict[str, Tensor | None] = {"dk": None, "dv": None}

    def payload_specs(j: int):
        return [p.q_spec(j), p.q_spec(j), p.stat_spec(j), p.stat_spec(j)]

    def compute(j: int, payload: list[Tensor]) -> list[Tensor]:
        qj, doj, lsej, deltaj = payload
        dqj, dkj, dvj = p.backend.backward(doj, qj, k, v, lsej, deltaj, p.mask(j, p.rank), p.scale)
        local["dk"] = accumulate(local["dk"], dkj, acc)
        local["dv"] = accumulate(local["dv"], dvj, acc)
        return [dqj.to(acc)]

    delta = output_delta(dout, out) if delta is None else delta
    if p.layout.world_size == 1:
        dq, dk, dv = p.backend.backward(dout.to(q.dtype), q, k, v, lse, delta, p.mask(0, 0), p.scale)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
    (dq,) = ring_pass(
        Ring(p.group, q.device),
        [q, dout.to(q.dtype), lse, delta],
        payload_specs,
        compute,
        lambda c, d: [c[0] + d[0]],
        lambda j: [p.q_spec(j, acc)],
    )
    return dq.to(q.dtype), local["dk"].to(k.dtype), local["dv"].to(v.dtype)


def query_ring_bytes(s: CallShape, rank: int, ranks_per_node: int | None = None) -> tuple[int, int]:
    """``(forward, backward)`` bytes ``rank`` sends: the query blocks and their carries."""
    e, a = s.elem_bytes, s.acc_bytes
    fwd_payload = [q_bytes(s, rows, e) for rows in s.q_lens]
    fwd_carry = [q_bytes(s, rows, a) + stat_bytes(s, rows) for rows in s.q_lens]
    bwd_payload = [2 * q_bytes(s, rows, e) + 2 * stat_bytes(s, rows) for rows in s.q_lens]
    bwd_carry = [q_bytes(s, rows, a) for rows in s.q_lens]
    return ring_bytes(fwd_payload, fwd_carry, rank), ring_bytes(bwd_payload, bwd_carry, rank)


def query_ring_seconds(
    s: CallShape, link: Link, compute: ComputeModel, rank: int, nbytes: tuple[int, int]
) -> tuple[float, float]:
    """``(forward, backward)`` seconds: ring steps overlapping compute and transfer."""
    return ring_seconds(s, link, compute, nbytes)


STRATEGY = Strategy("query_ring", query_ring_forward, query_ring_backward, query_ring_bytes, query_ring_seconds)
