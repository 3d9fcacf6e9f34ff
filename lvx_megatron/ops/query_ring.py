"""Query ring (LV-XAttn): visual K/V stay on their rank; query blocks and partial outputs travel.

Forward: the payload is ``(Q_j, mask rows_j)``; the carry is the running ``(O_j, LSE_j)``,
merged on every rank and delivered to its owner by the last hop.
Backward: the payload is ``(Q_j, dO_j, LSE_j, D_j, mask rows_j)``; the carry is the running
``dQ_j`` (fp32); ``dK``/``dV`` of the local shard accumulate locally and never travel.
"""

from torch import Tensor

from .merge import merge_partials
from .problem import CrossAttentionProblem, accumulate, output_delta
from .ring import Ring
from .ring_pass import ring_pass


def query_ring_forward(
    q: Tensor, k: Tensor, v: Tensor, q_mask_rows: Tensor | None, kv_ids: Tensor | None, p: CrossAttentionProblem
) -> tuple[Tensor, Tensor]:
    """Return this rank's ``(out, lse)``: ``out`` in ``q``'s dtype, ``lse`` ``[B, Sq, Hq]`` fp32."""
    acc = p.acc_dtype
    has_mask = q_mask_rows is not None
    if p.layout.world_size == 1:  # nothing to merge: the block kernel's result as it is
        o, lse = p.backend.forward(q, k, v, p.mask(q_mask_rows, kv_ids, q.shape[1]), p.scale)
        return o.to(q.dtype), lse.to(acc)

    def payload_specs(j: int):
        return [p.q_spec(j)] + ([p.q_mask_spec(j)] if has_mask else [])

    def compute(j: int, payload: list[Tensor]) -> list[Tensor]:
        qj = payload[0]
        mask = p.mask(payload[1] if has_mask else None, kv_ids, qj.shape[1])
        o, lse = p.backend.forward(qj, k, v, mask, p.scale)
        return [o.to(acc), lse.to(acc)]

    def combine(carry: list[Tensor], part: list[Tensor]) -> list[Tensor]:
        return list(merge_partials(carry[0], carry[1], part[0], part[1]))

    payload = [q] + ([q_mask_rows] if has_mask else [])
    carry_specs = lambda j: [p.q_spec(j, acc), p.stat_spec(j)]
    o, lse = ring_pass(Ring(p.group, q.device), payload, payload_specs, compute, combine, carry_specs)
    return o.to(q.dtype), lse


def query_ring_backward(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    q_mask_rows: Tensor | None,
    kv_ids: Tensor | None,
    p: CrossAttentionProblem,
    delta: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Return ``(dq, dk, dv)`` in the inputs' dtypes.

    ``delta`` (``rowsum(dO * O)``) may be given instead of being formed from ``out`` (which is then
    unused): callers that hold the rows of several ranks already have it.
    """
    acc = p.acc_dtype
    has_mask = q_mask_rows is not None
    local: dict[str, Tensor | None] = {"dk": None, "dv": None}

    def payload_specs(j: int):
        specs = [p.q_spec(j), p.q_spec(j), p.stat_spec(j), p.stat_spec(j)]
        return specs + ([p.q_mask_spec(j)] if has_mask else [])

    def compute(j: int, payload: list[Tensor]) -> list[Tensor]:
        qj, doj, lsej, deltaj = payload[:4]
        mask = p.mask(payload[4] if has_mask else None, kv_ids, qj.shape[1])
        dqj, dkj, dvj = p.backend.backward(doj, qj, k, v, lsej, deltaj, mask, p.scale)
        local["dk"] = accumulate(local["dk"], dkj, acc)
        local["dv"] = accumulate(local["dv"], dvj, acc)
        return [dqj.to(acc)]

    delta = output_delta(dout, out) if delta is None else delta
    if p.layout.world_size == 1:
        mask = p.mask(q_mask_rows, kv_ids, q.shape[1])
        dq, dk, dv = p.backend.backward(dout.to(q.dtype), q, k, v, lse, delta, mask, p.scale)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
    payload = [q, dout.to(q.dtype), lse, delta] + ([q_mask_rows] if has_mask else [])
    (dq,) = ring_pass(
        Ring(p.group, q.device),
        payload,
        payload_specs,
        compute,
        lambda c, d: [c[0] + d[0]],
        lambda j: [p.q_spec(j, acc)],
    )
    return dq.to(q.dtype), local["dk"].to(k.dtype), local["dv"].to(v.dtype)
