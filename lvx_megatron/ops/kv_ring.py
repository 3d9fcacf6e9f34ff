"""KV ring (Ring Attention), the baseline: queries stay; visual K/V blocks travel.

Forward: the payload is ``(K_j, V_j)``; the output and LSE accumulate locally.
Backward: the payload is ``(K_j, V_j)``; the carry is the running ``(dK_j, dV_j)`` (fp32),
delivered to the block's owner by the last hop; ``dQ`` accumulates locally. Image ids never
travel: every rank's plan (:class:`~.mask_plan.MaskPlan`) holds every block's ids.
"""

from torch import Tensor

from .cost_model import CallShape, ComputeModel, Link, kv_bytes, local_kv_bytes, ring_bytes, ring_seconds
from .merge import merge_partials
from .problem import CrossAttentionProblem, accumulate, output_delta
from .ring import Ring
from .ring_pass import ring_pass
from .strategy import Strategy


def kv_ring_forward(q: Tensor, k: Tensor, v: Tensor, p: CrossAttentionProblem) -> tuple[Tensor, Tensor]:
    """Return this rank's ``(out, lse)``: ``out`` in ``q``'s dtype, ``lse`` ``[B, Sq, Hq]`` fp32."""
    state: dict[str, Tensor] = {}

    def compute(j: int, payload: list[Tensor]) -> None:
        o, lse = p.backend.forward(q, payload[0], payload[1], p.mask(p.rank, j), p.scale)
        if state:
            o, lse = merge_partials(state["o"], state["lse"], o, lse)
        state["o"], state["lse"] = o.to(p.acc_dtype), lse.to(p.acc_dtype)

    ring_pass(Ring(p.group, q.device), [k, v], lambda j: [p.kv_spec(j), p.kv_spec(j)], compute)
    return state["o"].to(q.dtype), state["lse"]


def kv_ring_backward(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, p: CrossAttentionProblem
) -> tuple[Tensor, Tensor, Tensor]:
    """Return ``(dq, dk, dv)`` in the inputs' dtypes."""
    acc = p.acc_dtype
    dout = dout.to(q.dtype)
    delta = output_delta(dout, out)
    local: dict[str, Tensor | None] = {"dq": None}

    def compute(j: int, payload: list[Tensor]) -> list[Tensor]:
        dqj, dkj, dvj = p.backend.backward(dout, q, payload[0], payload[1], lse, delta, p.mask(p.rank, j), p.scale)
        local["dq"] = accumulate(local["dq"], dqj, acc)
        return [dkj.to(acc), dvj.to(acc)]

    dk, dv = ring_pass(
        Ring(p.group, q.device),
        [k, v],
        lambda j: [p.kv_spec(j), p.kv_spec(j)],
        compute,
        lambda c, d: [c[0] + d[0], c[1] + d[1]],
        lambda j: [p.kv_spec(j, acc), p.kv_spec(j, acc)],
    )
    return local["dq"].to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def kv_ring_bytes(s: CallShape, rank: int, ranks_per_node: int | None = None) -> tuple[int, int]:
    """``(forward, backward)`` bytes ``rank`` sends: the K/V blocks, and backward their gradients."""
    payload = [2 * kv_bytes(s, rows, s.elem_bytes) for rows in s.kv_lens]
    carry = [2 * kv_bytes(s, rows, s.acc_bytes) for rows in s.kv_lens]
    return ring_bytes(payload, [0] * s.world_size, rank), ring_bytes(payload, carry, rank)


def kv_ring_seconds(
    s: CallShape, link: Link, compute: ComputeModel, rank: int, nbytes: tuple[int, int]
) -> tuple[float, float]:
    """``(forward, backward)`` seconds: ring steps overlapping compute and transfer."""
    return ring_seconds(s, link, compute, nbytes)


def kv_ring_peak_kv_bytes(s: CallShape) -> int:
    """Its own K/V blocks and the two in flight (the double buffer)."""
    return 3 * local_kv_bytes(s)


STRATEGY = Strategy(
    "kv_ring", kv_ring_forward, kv_ring_backward, kv_ring_bytes, kv_ring_seconds, peak_kv_bytes=kv_ring_peak_kv_bytes
)
