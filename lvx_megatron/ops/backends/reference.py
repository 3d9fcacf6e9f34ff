"""Pure-torch block attention: any device, any float dtype (float64 for references).

GQA is handled by viewing the ``Hq`` query heads as ``[Hkv, G]``: each key/value head is read
once by its ``G`` query heads and never replicated.
"""

import torch
from torch import Tensor

from ..masks import BlockMask, dense_mask
from ..merge import accumulation_dtype, safe_lse
from .base import BlockAttentionBackend


def _scores(q: Tensor, k: Tensor, mask: Tensor | BlockMask | None, scale: float) -> Tensor:
    """Masked scores ``[B, Hkv, G, Sq, Skv]`` in the accumulation dtype."""
    b, sq, hq, d = q.shape
    hkv = k.shape[2]
    acc = accumulation_dtype(q.dtype)
    qg = q.to(acc).view(b, sq, hkv, hq // hkv, d)
    s = torch.einsum("bqhgd,bkhd->bhgqk", qg, k.to(acc)) * scale
    mask = dense_mask(mask)
    if mask is not None:
        s = s.masked_fill(~mask[:, None, None], float("-inf"))
    return s


def _grouped(x: Tensor, hkv: int) -> Tensor:
    """``[B, Sq, Hq]`` -> ``[B, Hkv, G, Sq, 1]`` to broadcast against scores."""
    b, sq, hq = x.shape
    return x.view(b, sq, hkv, hq // hkv).permute(0, 2, 3, 1).unsqueeze(-1)


class TorchReferenceBackend(BlockAttentionBackend):
    """Dense einsum attention; exact to the input precision, memory ``O(Sq * Skv)``."""

    name = "torch"

    def forward(
        self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | BlockMask | None, scale: float
    ) -> tuple[Tensor, Tensor]:
        b, sq, hq, d = q.shape
        s = _scores(q, k, mask, scale)
        lse = torch.logsumexp(s, dim=-1)
        p = torch.exp(s - safe_lse(lse).unsqueeze(-1))
        o = torch.einsum("bhgqk,bkhd->bqhgd", p, v.to(s.dtype)).reshape(b, sq, hq, d)
        return o, lse.permute(0, 3, 1, 2).reshape(b, sq, hq)

    def backward(
        self,
        dout: Tensor,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        lse: Tensor,
        delta: Tensor,
        mask: Tensor | BlockMask | None,
        scale: float,
    ) -> tuple[Tensor, Tensor, Tensor]:
        b, sq, hq, d = q.shape
        hkv = k.shape[2]
        s = _scores(q, k, mask, scale)
        acc = s.dtype
        p = torch.exp(s - _grouped(safe_lse(lse.to(acc)), hkv))
        dog = dout.to(acc).view(b, sq, hkv, hq // hkv, d)
        dv = torch.einsum("bhgqk,bqhgd->bkhd", p, dog)
        dp = torch.einsum("bqhgd,bkhd->bhgqk", dog, v.to(acc))
        ds = p * (dp - _grouped(delta.to(acc), hkv))
        dq = torch.einsum("bhgqk,bkhd->bqhgd", ds, k.to(acc)).reshape(b, sq, hq, d) * scale
        dk = torch.einsum("bhgqk,bqhgd->bkhd", ds, q.to(acc).view(b, sq, hkv, hq // hkv, d)) * scale
        return dq, dk, dv
