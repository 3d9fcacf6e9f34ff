"""``backend="auto"`` on CUDA: per call, the faster of our Triton kernels and torch's fused kernels.

The rule comes from the block-attention benchmark (``tools/bench_block_attention.py``; its
measurements are summarised in docs/ops.md):

- short query blocks (at most :data:`TRITON_MAX_PACKED_ROWS` packed rows per key/value head,
  e.g. 128 tokens of a 4-head group) run on the Triton kernels, masked or not (unmasked ones only
  with GQA: without it torch's flash kernel is as fast);
- taller blocks run on torch's fused kernels (cuDNN/flash): unmasked as they are, masked as their
  dense runs (:meth:`~lvx_megatron.ops.masks.BlockMask.dense_runs`) when there are few
  (:data:`MAX_DENSE_RUNS`) and each is tall (:data:`MIN_DENSE_RUN_ROWS` packed rows); other masks
  stay on the Triton kernels, whose cost follows the visible tiles;
- fp32 and head dims above 256 run on torch's kernels (ours would run fp32 matmuls without tensor
  cores).
"""

import torch
from torch import Tensor

from ..masks import MaskOrAll
from .base import BlockAttentionBackend
from .fused import TorchFusedBackend
from .triton_backend import TritonBackend, triton_unavailable_reason

# Packed rows per key/value head (Sq x Hq / Hkv) up to which our kernels beat torch's.
TRITON_MAX_PACKED_ROWS = 512
# A masked tall block runs on torch's kernels as at most this many dense runs, each at least this
# tall (every run is a launch, a packing copy of its rows and, for several key ranges, a gather
# of their K/V; short runs leave cuDNN's tiles idle).
MAX_DENSE_RUNS = 4
MIN_DENSE_RUN_ROWS = 1024


class ShapeSelectingBackend(BlockAttentionBackend):
    """Chooses :class:`TritonBackend` or :class:`TorchFusedBackend` per call from the block's shape."""

    name = "auto"

    def __init__(self) -> None:
        self.triton = TritonBackend()
        self.fused = TorchFusedBackend()

    def choose(self, q: Tensor, kv_heads: int, mask: MaskOrAll, backward: bool) -> BlockAttentionBackend:
        """The backend of one forward (or backward) call."""
        if q.dtype not in (torch.float16, torch.bfloat16) or triton_unavailable_reason(q.device) is not None:
            return self.fused
        if q.shape[-1] > 256:
            return self.fused
        group = q.shape[2] // kv_heads
        if group * q.shape[1] <= TRITON_MAX_PACKED_ROWS:
            return self.triton if mask is not None or group > 1 else self.fused
        if mask is None:
            return self.fused
        runs = [run for sample in mask.dense_runs() for run in sample]
        tall = all((end - first) * group >= MIN_DENSE_RUN_ROWS for first, end, _ in runs)
        return self.fused if tall and max(map(len, mask.dense_runs())) <= MAX_DENSE_RUNS else self.triton

    def forward(self, q: Tensor, k: Tensor, v: Tensor, mask: MaskOrAll, scale: float) -> tuple[Tensor, Tensor]:
        return self.choose(q, k.shape[2], mask, backward=False).forward(q, k, v, mask, scale)

    def backward(
        self, dout: Tensor, q: Tensor, k: Tensor, v: Tensor, lse: Tensor, delta: Tensor, mask: MaskOrAll, scale: float
    ) -> tuple[Tensor, Tensor, Tensor]:
        return self.choose(q, k.shape[2], mask, backward=True).backward(dout, q, k, v, lse, delta, mask, scale)
