"""``backend="auto"`` on CUDA: per call, the faster of our Triton kernels and torch's fused kernels.

The rule comes from the block-attention benchmark (``tools/bench_block_attention.py``); how
much faster each side is, measured, is in the README's GPU results (rendered from the benchmark's
results file), not here:

- masked blocks (every block of a Llama-3.2-Vision model) run on the Triton kernels, which beat
  torch's only masked GQA path (the memory-efficient kernel with a dense bias) at every shape;
- unmasked backward passes of short GQA query blocks (at most 256 packed rows per key/value head:
  64 tokens of a 4-head group) run on the Triton kernels, which beat the best torch kernel there;
- everything else (unmasked forwards, taller blocks) runs on torch's kernels (cuDNN/flash), and
  fp32 too (ours would run fp32 matmuls without tensor cores).
"""

import torch
from torch import Tensor

from ..masks import BlockMask
from .base import BlockAttentionBackend
from .fused import TorchFusedBackend
from .triton_backend import TritonBackend, triton_unavailable_reason

# Unmasked backward passes of GQA blocks with at most this many packed rows per key/value head
# (Sq x Hq / Hkv) go to the Triton kernels; taller blocks, and blocks without GQA, run as fast or
# faster on torch's fused kernels.
TRITON_MAX_PACKED_ROWS_BACKWARD = 256


class ShapeSelectingBackend(BlockAttentionBackend):
    """Chooses :class:`TritonBackend` or :class:`TorchFusedBackend` per call from the block's shape."""

    name = "auto"

    def __init__(self) -> None:
        self.triton = TritonBackend()
        self.fused = TorchFusedBackend()

    def choose(
        self, q: Tensor, kv_heads: int, mask: Tensor | BlockMask | None, backward: bool
    ) -> BlockAttentionBackend:
        """The backend of one forward (or backward) call."""
        if q.dtype not in (torch.float16, torch.bfloat16) or triton_unavailable_reason(q.device) is not None:
            return self.fused
        if q.shape[-1] > 256:
            return self.fused
        if mask is not None:
            return self.triton
        group = q.shape[2] // kv_heads
        short = group > 1 and group * q.shape[1] <= TRITON_MAX_PACKED_ROWS_BACKWARD
        return self.triton if backward and short else self.fused

    def forward(
        self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | BlockMask | None, scale: float
    ) -> tuple[Tensor, Tensor]:
        return self.choose(q, k.shape[2], mask, backward=False).forward(q, k, v, mask, scale)

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
        return self.choose(q, k.shape[2], mask, backward=True).backward(dout, q, k, v, lse, delta, mask, scale)
