"""A dense, obviously-correct cross-attention for tests and exactness checks.

It shares no code with the distributed strategies or the block backends: GQA by repeating K/V,
masks from the ids by direct comparison, ``torch.softmax`` and autograd for gradients. Run it in
float64 on the full (gathered) tensors.
"""

import torch
from torch import Tensor


def dense_cross_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    softmax_scale: float | None,
    q_image_mask: Tensor | None,
    kv_image_ids: Tensor | None,
) -> Tensor:
    """Exact attention of full ``q`` ``[B, Sq, Hq, D]`` against full ``k``/``v`` ``[B, Skv, Hkv, D]``.

    Text rows that see no visual token get zero output and zero gradient.
    """
    b, sq, hq, d = q.shape
    skv, hkv = k.shape[1], k.shape[2]
    scale = d**-0.5 if softmax_scale is None else softmax_scale
    k_rep = k.repeat_interleave(hq // hkv, dim=2)
    v_rep = v.repeat_interleave(hq // hkv, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k_rep) * scale
    visible = torch.ones(b, sq, skv, dtype=torch.bool, device=q.device)
    if kv_image_ids is not None:
        visible = visible & (kv_image_ids >= 0)[:, None, :]
        if q_image_mask is not None:
            ids = torch.arange(q_image_mask.shape[-1], device=q.device)
            one_hot = kv_image_ids[:, :, None] == ids  # [B, Skv, N_ids]
            visible = visible & torch.einsum("bqn,bkn->bqk", q_image_mask.double(), one_hot.double()).bool()
    row_sees_any = visible.any(-1)  # [B, Sq]
    # Rows that see nothing get neutral scores (finite softmax) and are zeroed afterwards.
    keep = visible | ~row_sees_any[..., None]
    scores = scores.masked_fill(~keep[:, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1) * row_sees_any[:, None, :, None]
    return torch.einsum("bhqk,bkhd->bqhd", probs, v_rep)
