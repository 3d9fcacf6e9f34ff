"""KV ring (Ring Attention), the baseline: queries stay; visual K/V blocks travel.

Forward: the payload is ``(K_j, V_j, ids_j)``; the output and LSE accumulate locally.
Backward: the payload is ``(K_j, V_j, ids_j)``; the carry is the running ``(dK_j, dV_j)`` (fp32),
delivered to the block's owner by the last hop; ``dQ`` accumulates locally.
"""

import torch
from torch import Tensor

from .merge import merge_partials
from .problem import CrossAttentionProblem, accumulate, output_delta
from .ring import Ring
from .ring_pass import ring_pass


def _payload_specs(p: CrossAttentionProblem, has_ids: bool):
    def specs(j: int):
        return [p.kv_spec(j), p.kv_spec(j)] + ([p.kv_ids_spec(j)] if has_ids else [])

    return specs


class KVRingAttention(torch.autograd.Function):
    """Autograd function of the KV ring; see :func:`lvx_megatron.ops.distributed_cross_attention`."""

    @staticmethod
    def forward(ctx, q, k, v, q_mask_rows, kv_ids, problem: CrossAttentionProblem):
        p = problem
        has_ids = kv_ids is not None
        state: dict[str, Tensor] = {}

        def compute(j: int, payload: list[Tensor]) -> None:
            mask = p.mask(q_mask_rows, payload[2] if has_ids else None, q.shape[1])
            o, lse = p.backend.forward(q, payload[0], payload[1], mask, p.scale)
            if state:
                o, lse = merge_partials(state["o"], state["lse"], o, lse)
            state["o"], state["lse"] = o.to(p.acc_dtype), lse.to(p.acc_dtype)

        ring = Ring(p.group, q.device)
        ring_pass(ring, [k, v] + ([kv_ids] if has_ids else []), _payload_specs(p, has_ids), compute)
        out = state["o"].to(q.dtype)
        ctx.problem = p
        ctx.save_for_backward(q, k, v, out, state["lse"], q_mask_rows, kv_ids)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, q_mask_rows, kv_ids = ctx.saved_tensors
        p: CrossAttentionProblem = ctx.problem
        acc = p.acc_dtype
        has_ids = kv_ids is not None
        dout = dout.to(q.dtype)
        delta = output_delta(dout, out)
        local: dict[str, Tensor | None] = {"dq": None}

        def compute(j: int, payload: list[Tensor]) -> list[Tensor]:
            mask = p.mask(q_mask_rows, payload[2] if has_ids else None, q.shape[1])
            dqj, dkj, dvj = p.backend.backward(dout, q, payload[0], payload[1], lse, delta, mask, p.scale)
            local["dq"] = accumulate(local["dq"], dqj, acc)
            return [dkj.to(acc), dvj.to(acc)]

        ring = Ring(p.group, q.device)
        dk, dv = ring_pass(
            ring,
            [k, v] + ([kv_ids] if has_ids else []),
            _payload_specs(p, has_ids),
            compute,
            lambda c, d: [c[0] + d[0], c[1] + d[1]],
            lambda j: [p.kv_spec(j, acc), p.kv_spec(j, acc)],
        )
        return local["dq"].to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None
