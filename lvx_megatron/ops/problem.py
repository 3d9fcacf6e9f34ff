"""What every strategy needs to know about one cross-attention call besides the tensors."""

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from .backends import BlockAttentionBackend
from .mask_plan import MaskPlan
from .masks import BlockMask
from .merge import accumulation_dtype
from .ring import TensorSpec
from .shard_layout import ShardLayout

ALL = None  # a block index meaning "every block of the problem"


@dataclass(frozen=True)
class CrossAttentionProblem:
    """Shapes, scale, backend and group of one distributed call (shared by forward and backward)."""

    group: dist.ProcessGroup | None  # None: the default group when distributed, else one process
    rank: int  # this process's rank in the group
    layout: ShardLayout
    batch: int
    q_heads: int
    kv_heads: int
    head_dim: int
    dtype: torch.dtype
    scale: float
    backend: BlockAttentionBackend
    head_chunks: int = 1  # q_allgather: chunks of whole K/V-head groups its collectives are pipelined over
    plan: MaskPlan | None = None  # None: no mask
    # The ranks of the plan whose text (visual) shards make up block j of this problem: rank j in a
    # flat problem, node j's ranks (rank j * L + i) in the hierarchical strategy's ring across nodes.
    q_blocks: tuple[slice, ...] = ()
    kv_blocks: tuple[slice, ...] = ()

    @property
    def acc_dtype(self) -> torch.dtype:
        return accumulation_dtype(self.dtype)

    def mask(self, q_block: int | None, kv_block: int | None) -> BlockMask | None:
        """The mask of query block ``q_block`` against key block ``kv_block`` (:data:`ALL`: every
        block, in order), or None without a mask."""
        if self.plan is None:
            return None
        span = lambda blocks, j: slice(blocks[0].start, blocks[-1].stop) if j is ALL else blocks[j]
        return self.plan.block(span(self.q_blocks, q_block), span(self.kv_blocks, kv_block))

    def q_spec(self, j: int, dtype: torch.dtype | None = None) -> TensorSpec:
        """``[B, Sq_j, Hq, D]``."""
        return TensorSpec((self.batch, self.layout.q_lens[j], self.q_heads, self.head_dim), dtype or self.dtype)

    def stat_spec(self, j: int) -> TensorSpec:
        """``[B, Sq_j, Hq]`` in the accumulation dtype (LSE, delta)."""
        return TensorSpec((self.batch, self.layout.q_lens[j], self.q_heads), self.acc_dtype)

    def kv_spec(self, j: int, dtype: torch.dtype | None = None) -> TensorSpec:
        """``[B, Skv_j, Hkv, D]``."""
        return TensorSpec((self.batch, self.layout.kv_lens[j], self.kv_heads, self.head_dim), dtype or self.dtype)


def output_delta(dout: Tensor, out: Tensor) -> Tensor:
    """``D = rowsum(dO * O)`` ``[B, Sq, Hq]`` in the accumulation dtype."""
    acc = accumulation_dtype(out.dtype)
    return (dout.to(acc) * out.to(acc)).sum(-1)


def accumulate(total: Tensor | None, part: Tensor, acc: torch.dtype) -> Tensor:
    """Add ``part`` to a running sum kept in ``acc`` precision.

    The first part is kept as it is: a pass of one step (one rank) then adds no conversion or
    copy of the (large) K/V-sized gradients; from the second part on the sum is in ``acc``.
    """
    if total is None:
        return part
    return (total if total.dtype == acc else total.to(acc)).add_(part)
