"""Collectives over shards of uneven length along dim 1, counted like ring exchanges.

gloo has no reduce-scatter and all collectives want equal shapes, so shards are padded to the
longest; NCCL groups use ``reduce_scatter_tensor``, other backends an all-reduce and a slice.
The ``post_*`` forms return at once with a :class:`Pending` (the collective runs on the process
group's stream or thread), so callers can compute while it is in flight.
"""

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from .comm_stats import record_bytes, record_sent


class Pending:
    """A posted collective; :meth:`wait` completes it and returns its result (the same on every call)."""

    def __init__(self, work: Any, finish: Callable[[], Any], keep: tuple = ()) -> None:
        self._work = work
        self._finish = finish
        self._keep = keep  # tensors the collective reads, kept alive until it completes
        self._done = False
        self._result: Any = None

    def wait(self) -> Any:
        if not self._done:
            if self._work is not None:
                self._work.wait()
            self._result, self._done = self._finish(), True
            self._work, self._finish, self._keep = None, None, ()
        return self._result


def _pad_rows(x: Tensor, rows: int) -> Tensor:
    if x.shape[1] == rows:
        return x.contiguous()
    out = x.new_zeros((x.shape[0], rows, *x.shape[2:]))
    out[:, : x.shape[1]] = x
    return out


def post_all_gather_rows(x: Tensor, lens: list[int], group: dist.ProcessGroup | None, name: str) -> Pending:
    """Post :func:`all_gather_rows`; ``wait()`` returns the concatenated rows."""
    n = len(lens)
    if n == 1:
        return Pending(None, lambda: x)
    padded = _pad_rows(x, max(lens))
    parts = [torch.empty_like(padded) for _ in range(n)]
    work = dist.all_gather(parts, padded, group=group, async_op=True)
    record_sent(name, [x], copies=n - 1)
    return Pending(
        work, lambda: torch.cat([p[:, :length] for p, length in zip(parts, lens, strict=True)], dim=1), (padded,)
    )


def all_gather_rows(x: Tensor, lens: list[int], group: dist.ProcessGroup | None, name: str) -> Tensor:
    """Concatenate every rank's ``[B, lens[r], ...]`` shard along dim 1 (rank order)."""
    return post_all_gather_rows(x, lens, group, name).wait()


def post_reduce_scatter_rows(
    x: Tensor, lens: list[int], rank: int, group: dist.ProcessGroup | None, name: str
) -> Pending:
    """Post :func:`reduce_scatter_rows`; ``wait()`` returns this rank's summed rows."""
    n = len(lens)
    if n == 1:
        return Pending(None, lambda: x)
    starts = [sum(lens[:r]) for r in range(n)]
    longest = max(lens)
    own = lens[rank]
    if dist.get_backend(group) == "nccl":
        chunks = torch.stack([_pad_rows(x[:, s : s + length], longest) for s, length in zip(starts, lens, strict=True)])
        out = torch.empty_like(chunks[0])
        work = dist.reduce_scatter_tensor(out, chunks, group=group, async_op=True)
        record_sent(name, [chunks[0]], copies=n - 1)
        return Pending(work, lambda: out[:, :own], (chunks,))
    total = x.contiguous().clone()
    work = dist.all_reduce(total, group=group, async_op=True)
    record_sent(name, [x[:, :longest]], copies=n - 1)  # what a reduce-scatter would send
    return Pending(work, lambda: total[:, starts[rank] : starts[rank] + own])


def reduce_scatter_rows(x: Tensor, lens: list[int], rank: int, group: dist.ProcessGroup | None, name: str) -> Tensor:
    """Sum ``x`` (``[B, sum(lens), ...]``, one per rank) over ranks; return this rank's rows."""
    return post_reduce_scatter_rows(x, lens, rank, group, name).wait()


def all_reduce_lse(lse: Tensor, group: dist.ProcessGroup | None, n: int, name: str) -> Tensor:
    """Global log-sum-exp over the ``n`` ranks of per-rank partial LSEs (``-inf``: saw nothing)."""
    if n == 1:
        return lse
    peak = lse.clone()
    dist.all_reduce(peak, op=dist.ReduceOp.MAX, group=group)
    safe_peak = peak.masked_fill(torch.isneginf(peak), 0.0)
    total = torch.exp(lse - safe_peak)
    dist.all_reduce(total, group=group)
    # Two all-reduces; a ring all-reduce sends 2 (n - 1) / n of the tensor per rank.
    record_bytes(name, 2 * (2 * (n - 1) * lse.numel() * lse.element_size()) // n, messages=2)
    return safe_peak + torch.log(total)
