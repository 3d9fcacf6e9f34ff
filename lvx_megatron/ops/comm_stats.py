"""Counting the bytes a process sends, for demos, tests and the cost model.

Ring exchanges count what they send. Collectives count what a ring algorithm sends per rank:
``(n - 1)`` shards for an all-gather or a reduce-scatter, ``2 (n - 1) / n`` of the tensor for an
all-reduce.
"""

import contextlib
import contextvars
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from torch import Tensor


@dataclass
class CommStats:
    """Bytes and messages this process sent while the counter was active."""

    bytes_sent: int = 0
    messages: int = 0
    by_name: dict[str, int] = field(default_factory=dict)

    def add_bytes(self, name: str, nbytes: int, messages: int = 1) -> None:
        self.bytes_sent += nbytes
        self.messages += messages
        self.by_name[name] = self.by_name.get(name, 0) + nbytes


_active_stats: contextvars.ContextVar[CommStats | None] = contextvars.ContextVar("lvx_comm_stats", default=None)


@contextlib.contextmanager
def count_communication() -> Iterator[CommStats]:
    """Count the bytes this process sends through the ops inside the ``with`` block."""
    stats = CommStats()
    token = _active_stats.set(stats)
    try:
        yield stats
    finally:
        _active_stats.reset(token)


def record_bytes(name: str, nbytes: int, messages: int = 1) -> None:
    """Count ``nbytes`` sent under ``name`` when a counter is active."""
    stats = _active_stats.get()
    if stats is not None:
        stats.add_bytes(name, nbytes, messages)


def record_sent(name: str, tensors: Sequence[Tensor], copies: int = 1) -> None:
    """Count ``copies`` sends of ``tensors`` under ``name`` when a counter is active."""
    nbytes = sum(t.numel() * t.element_size() for t in tensors)
    record_bytes(name, copies * nbytes, copies * len(tensors))
