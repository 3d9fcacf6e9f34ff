"""Pure-torch block attention: any device, any float dtype (float64 for references).

GQA is handled by viewing the ``Hq`` query heads as ``[Hkv, G]``: each key/value head is read
once by its ``G`` query heads and never replicated.

Masked keys take no part in any row that does not see them, even when their K or V hold NaN or
Inf (uninitialised padding): their scores are ``-inf``, their probabilities are selected to 0
rather than multiplied, and their K/V rows enter the products sanitised. A row that does see a
non-finite value still gets a non-finite result.
"""

import torch
from torch import Tensor

from ..masks import MaskOrAll
from ..merge import accumulation_dtype, safe_lse
from .base import BlockAttentionBackend


def _scores(q: Tensor, k: Tensor, visible: Tensor | None, scale: float) -> Tensor:
    """Masked scores ``[B, Hkv, G, Sq, Skv]`` in the accumulation dtype."""
    b, sq, hq, d = q.shape
    hkv = k.shape[2]
    acc = accumulation_dtype(q.dtype)
    qg = q.to(acc).view(b, sq, hkv, hq // hkv, d)
    s = torch.einsum("bqhgd,bkhd->bhgqk", qg, k.to(acc)) * scale
    if visible is not None:
        s = s.masked_fill(~visible[:, None, None], float("-inf"))
    return s


def _grouped(x: Tensor, hkv: int) -> Tensor:
    """``[B, Sq, Hq]`` -> ``[B, Hkv, G, Sq, 1]`` to broadcast against scores."""
    b, sq, hq = x.shape
    return x.view(b, sq, hkv, hq // hkv).permute(0, 2, 3, 1).unsqueeze(-1)


def _finite_rows(x: Tensor) -> Tensor:
    """``[B, S, H]``: whether each key/value row of ``[B, S, H, D]`` is finite."""
    return torch.isfinite(x).all(-1)


def _sanitised(x: Tensor, acc: torch.dtype) -> Tensor:
    """``x`` in ``acc`` with every non-finite key/value row zeroed (for the masked products)."""
    return torch.where(_finite_rows(x).unsqueeze(-1), x.to(acc), 0.0)


class TorchReferenceBackend(BlockAttentionBackend):
    """Dense einsum attention; exact to the input precision, memory ``O(Sq * Skv)``."""

    name = "torch"

    def forward(self, q: Tensor, k: Tensor, v: Tensor, mask: MaskOrAll, scale: float) -> tuple[Tensor, Tensor]:
        b, sq, hq, d = q.shape
        visible = None if mask is None else mask.dense()
        s = _scores(q, k, visible, scale)
        lse = torch.logsumexp(s, dim=-1)
        p = torch.exp(s - safe_lse(lse).unsqueeze(-1))
        if visible is None:
            o = torch.einsum("bhgqk,bkhd->bqhgd", p, v.to(s.dtype))
        else:
            p = torch.where(visible[:, None, None], p, 0.0)
            o = torch.einsum("bhgqk,bkhd->bqhgd", p, _sanitised(v, s.dtype))
            # rows that see a non-finite value must not look finite (a boolean reduction, no matmul)
            sees_bad = (visible.unsqueeze(-1) & ~_finite_rows(v).unsqueeze(1)).any(2)
            o = o.masked_fill(sees_bad[..., None, None], float("nan"))
        return o.reshape(b, sq, hq, d), lse.permute(0, 3, 1, 2).reshape(b, sq, hq)

    def backward(
        self, dout: Tensor, q: Tensor, k: Tensor, v: Tensor, lse: Tensor, delta: Tensor, mask: MaskOrAll, scale: float
    ) -> tuple[Tensor, Tensor, Tensor]:
        b, sq, hq, d = q.shape
        hkv = k.shape[2]
        visible = None if mask is None else mask.dense()
        s = _scores(q, k, visible, scale)
        acc = s.dtype
        p = torch.exp(s - _grouped(safe_lse(lse.to(acc)), hkv))
        dog = dout.to(acc).view(b, sq, hkv, hq // hkv, d)
        dp = torch.einsum("bqhgd,bkhd->bhgqk", dog, v.to(acc))
        ds = p * (dp - _grouped(delta.to(acc), hkv))
        k_used = k.to(acc)
        if visible is not None:
            p = torch.where(visible[:, None, None], p, 0.0)
            ds = torch.where(visible[:, None, None], ds, 0.0)
            k_used = _sanitised(k, acc)
        dv = torch.einsum("bhgqk,bqhgd->bkhd", p, dog)
        dq = torch.einsum("bhgqk,bkhd->bqhgd", ds, k_used).reshape(b, sq, hq, d) * scale
        dk = torch.einsum("bhgqk,bqhgd->bkhd", ds, q.to(acc).view(b, sq, hkv, hq // hkv, d)) * scale
        return dq, dk, dv
