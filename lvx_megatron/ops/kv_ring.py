"""KV ring (Ring Attention), the baseline: queries stay; visual K/V blocks travel.

Forward: the payload is ``(K_j, V_j, ids_j)``; the output and LSE accumulate locally.
Backward: the payload is ``(K_j, V_j, ids_j)``; the carry is the running ``(dK_j, dV_j)`` (fp32),
delivered to the block's owner by the last hop; ``dQ`` accumulates locally.
"""

from torch import Tensor

from .merge import merge_partials
from .problem import CrossAttentionProblem, accumulate, output_delta
from .ring import Ring
from .ring_pass import ring_pass


def _payload(k: Tensor, v: Tensor, kv_ids: Tensor | None, p: CrossAttentionProblem):
    has_ids = kv_ids is not None

    def specs(j: int):
        return [p.kv_spec(j), p.kv_spec(j)] + ([p.kv_ids_spec(j)] if has_ids else [])

    return [k, v] + ([kv_ids] if has_ids else []), specs


def kv_ring_forward(
    q: Tensor, k: Tensor, v: Tensor, q_mask_rows: Tensor | None, kv_ids: Tensor | None, p: CrossAttentionProblem
) -> tuple[Tensor, Tensor]:
    """Return this rank's ``(out, lse)``: ``out`` in ``q``'s dtype, ``lse`` ``[B, Sq, Hq]`` fp32."""
    state: dict[str, Tensor] = {}

    def compute(j: int, payload: list[Tensor]) -> None:
        mask = p.mask(q_mask_rows, payload[2] if len(payload) > 2 else None, q.shape[1])
        o, lse = p.backend.forward(q, payload[0], payload[1], mask, p.scale)
        if state:
            o, lse = merge_partials(state["o"], state["lse"], o, lse)
        state["o"], state["lse"] = o.to(p.acc_dtype), lse.to(p.acc_dtype)

    payload, specs = _payload(k, v, kv_ids, p)
    ring_pass(Ring(p.group, q.device), payload, specs, compute)
    return state["o"].to(q.dtype), state["lse"]


def kv_ring_backward(
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
    """Return ``(dq, dk, dv)`` in the inputs' dtypes."""
    acc = p.acc_dtype
    dout = dout.to(q.dtype)
    delta = output_delta(dout, out)
    local: dict[str, Tensor | None] = {"dq": None}

    def compute(j: int, payload: list[Tensor]) -> list[Tensor]:
        mask = p.mask(q_mask_rows, payload[2] if len(payload) > 2 else None, q.shape[1])
        dqj, dkj, dvj = p.backend.backward(dout, q, payload[0], payload[1], lse, delta, mask, p.scale)
        local["dq"] = accumulate(local["dq"], dqj, acc)
        return [dkj.to(acc), dvj.to(acc)]

    payload, specs = _payload(k, v, kv_ids, p)
    dk, dv = ring_pass(
        Ring(p.group, q.device),
        payload,
        specs,
        compute,
        lambda c, d: [c[0] + d[0], c[1] + d[1]],
        lambda j: [p.kv_spec(j, acc), p.kv_spec(j, acc)],
    )
    return local["dq"].to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
