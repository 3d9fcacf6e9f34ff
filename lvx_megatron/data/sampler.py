"""Stateless data-parallel sampling: the sample indices of any iteration are a pure function of it.

The global sample stream is ``perm(epoch_0) ++ perm(epoch_1) ++ ...`` where ``perm(e)`` is a permutation of
``range(num_samples)`` seeded by ``(seed, e)``. Iteration ``k`` consumes stream positions
``[k * gbs, (k + 1) * gbs)``; within it, micro-batch ``m`` of DP rank ``r`` takes the ``mbs`` positions
starting at ``(m * dp_size + r) * mbs``. Resuming at iteration ``k`` therefore needs no sampler state.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from lvx_megatron.data.checks import check_positive


@lru_cache(maxsize=4)
def _epoch_permutation(seed: int, epoch: int, num_samples: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(num_samples)


def micro_batches(
    iteration: int,
    global_batch_size: int,
    micro_batch_size: int,
    dp_rank: int,
    dp_size: int,
    num_samples: int,
    seed: int = 0,
) -> list[list[int]]:
    """Sample indices of this DP rank at ``iteration``: ``num_microbatches`` lists of ``micro_batch_size``.

    ``num_microbatches = global_batch_size // (micro_batch_size * dp_size)``. Every sample appears exactly once
    per epoch of the global stream, over all ranks.
    """
    check_positive(
        global_batch_size=global_batch_size, micro_batch_size=micro_batch_size, dp_size=dp_size, num_samples=num_samples
    )
    if iteration < 0:
        raise ValueError(f"iteration must be >= 0, got {iteration}")
    if not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank must be in [0, dp_size={dp_size}), got {dp_rank}")
    if global_batch_size % (micro_batch_size * dp_size) != 0:
        raise ValueError(
            f"global_batch_size ({global_batch_size}) must be divisible by micro_batch_size * dp_size "
            f"({micro_batch_size} * {dp_size} = {micro_batch_size * dp_size})"
        )
    num_micro = global_batch_size // (micro_batch_size * dp_size)
    base = iteration * global_batch_size
    out: list[list[int]] = []
    for m in range(num_micro):
        start = base + (m * dp_size + dp_rank) * micro_batch_size
        batch = []
        for pos in range(start, start + micro_batch_size):
            epoch, within = divmod(pos, num_samples)
            batch.append(int(_epoch_permutation(seed, epoch, num_samples)[within]))
        out.append(batch)
    return out
