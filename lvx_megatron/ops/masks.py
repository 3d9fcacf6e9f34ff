"""Llama-3.2-Vision cross-attention masks in their compact, shardable form.

Every visual token carries the id of its image (or image tile); ``-1`` marks padding, which no
text token ever attends. Every text token carries one boolean per id saying whether it may see
that image. The boolean rows travel with the queries, the ids stay with the keys, and the dense
block mask of one (query block, key shard) pair is rebuilt where it is needed.
"""

from dataclasses import dataclass

import torch
from torch import Tensor


def block_mask(q_image_mask: Tensor | None, kv_image_ids: Tensor | None, num_queries: int) -> Tensor | None:
    """Dense ``[B, Sq, Skv]`` boolean mask (True = attend) of one query block and one KV shard.

    Args:
        q_image_mask: ``[B, Sq, N_ids]`` visibility of each id per text token, or None when every
            text token sees every non-padding visual token.
        kv_image_ids: ``[B, Skv]`` id per visual token, ``-1`` for padding, or None (no mask).
        num_queries: ``Sq``, used when only ``kv_image_ids`` is given.

    Returns:
        None when neither is given (no masking at all).
    """
    if kv_image_ids is None:
        return None
    valid = kv_image_ids >= 0
    if q_image_mask is None:
        return valid.unsqueeze(1).expand(-1, num_queries, -1)
    index = kv_image_ids.clamp(min=0).unsqueeze(1).expand(-1, q_image_mask.shape[1], -1)
    return torch.gather(q_image_mask.bool(), 2, index) & valid.unsqueeze(1)


@dataclass(frozen=True)
class BlockMask:
    """The compact mask of one (query block, key shard) pair, as the strategies hand it to a backend.

    Kernels that read the compact form directly (the Triton backend) never build the dense
    ``[B, Sq, Skv]`` mask, which for long visual shards is larger than the queries themselves.
    """

    q_image_mask: Tensor | None  # [B, Sq, N_ids] bool, or None: every row sees every valid id
    kv_image_ids: Tensor  # [B, Skv] integer ids, -1 for padding
    num_queries: int

    def dense(self) -> Tensor:
        """The dense ``[B, Sq, Skv]`` boolean mask (True = attend)."""
        return block_mask(self.q_image_mask, self.kv_image_ids, self.num_queries)


def dense_mask(mask: "Tensor | BlockMask | None") -> Tensor | None:
    """A backend's mask argument as a dense boolean tensor (or None)."""
    return mask.dense() if isinstance(mask, BlockMask) else mask
