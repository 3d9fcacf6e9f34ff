"""The block-attention backend interface used by every distributed strategy.

A backend computes exact softmax attention of one query block against one key/value block and
the matching backward. Layouts follow the ops API: ``q`` ``[B, Sq, Hq, D]``, ``k``/``v``
``[B, Skv, Hkv, D]`` with ``Hq`` a multiple of ``Hkv`` (query head ``h`` reads key/value head
``h // (Hq // Hkv)``), ``mask`` the compact :class:`~lvx_megatron.ops.masks.BlockMask` the
strategies pass (or None), whose derived forms each backend reads as it needs; LSE and
``delta = rowsum(dO * O)`` ``[B, Sq, Hq]`` in fp32 (fp64 for fp64 inputs).
"""

from abc import ABC, abstractmethod

from torch import Tensor

from ..masks import MaskOrAll


class BlockAttentionBackend(ABC):
    """Exact attention of one query block against one KV block, forward and backward."""

    name: str

    @abstractmethod
    def forward(self, q: Tensor, k: Tensor, v: Tensor, mask: MaskOrAll, scale: float) -> tuple[Tensor, Tensor]:
        """Return ``(o, lse)``: ``o`` ``[B, Sq, Hq, D]`` normalised over this block's keys,
        ``lse`` ``[B, Sq, Hq]``; rows with no visible key get ``o = 0``, ``lse = -inf``. Keys a row
        does not see never affect its results, even when they hold NaN or Inf."""

    @abstractmethod
    def backward(
        self, dout: Tensor, q: Tensor, k: Tensor, v: Tensor, lse: Tensor, delta: Tensor, mask: MaskOrAll, scale: float
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Return ``(dq, dk, dv)`` of this block given the *global* ``lse`` and ``delta``.

        With the global statistics the block's gradients are exact contributions to the full
        attention's gradients, so blocks can be summed in any order.
        """
