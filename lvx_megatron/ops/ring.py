"""The ring: neighbour ranks, batched point-to-point transfers and double buffers.

Algorithm code never calls ``torch.distributed`` point-to-point functions directly. It asks the
ring to :meth:`Ring.exchange` a list of tensors (send to the next rank, receive the matching list
from the previous one), computes, and only then waits on the handle. The transfer runs on the
process group's own stream (NCCL) or thread (gloo) while the compute proceeds, so the loop reads
"post next transfer; compute; wait".
"""

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from .comm_stats import record_sent
from .groups import rank_and_size


@dataclass(frozen=True)
class TensorSpec:
    """Shape and dtype of a tensor to receive."""

    shape: tuple[int, ...]
    dtype: torch.dtype


class PendingExchange:
    """A posted exchange; :meth:`wait` returns the received tensors."""

    def __init__(self, works: list, received: list[Tensor], sent: list[Tensor]) -> None:
        self._works = works
        self._received = received
        self._sent = sent  # kept alive until the transfer completes

    def wait(self) -> list[Tensor]:
        for work in self._works:
            work.wait()
        self._works, self._sent = [], []
        return self._received


class Ring:
    """Ring topology over a process group, with per-stream double buffers.

    Args:
        group: the process group (None: the default group when initialised, else one process).
        device: device of the tensors that travel (buffers are allocated there).
    """

    def __init__(self, group: dist.ProcessGroup | None, device: torch.device) -> None:
        self.group = group
        _, self.rank, self.world_size = rank_and_size(group)
        self.device = device
        if self.world_size > 1:
            self.next_rank = dist.get_global_rank(group or dist.group.WORLD, (self.rank + 1) % self.world_size)
            self.prev_rank = dist.get_global_rank(group or dist.group.WORLD, (self.rank - 1) % self.world_size)
        self._buffers: dict[str, list[list[Tensor | None]]] = {}
        self._parity: dict[str, int] = {}

    def _buffer(self, name: str, index: int, spec: TensorSpec) -> Tensor:
        """A receive buffer for ``spec``; the two buffers of ``name`` alternate between calls.

        Buffers are kept at their largest size and viewed down, so uneven block sizes reuse
        the same memory.
        """
        slots = self._buffers.setdefault(name, [[], []])[self._parity.get(name, 0)]
        while len(slots) <= index:
            slots.append(None)
        numel = 1
        for n in spec.shape:
            numel *= n
        buf = slots[index]
        if buf is None or buf.dtype != spec.dtype or buf.numel() < numel:
            buf = torch.empty(max(numel, 1), dtype=spec.dtype, device=self.device)
            slots[index] = buf
        return buf[:numel].view(spec.shape)

    def exchange(self, name: str, send: Sequence[Tensor], recv_specs: Sequence[TensorSpec]) -> PendingExchange:
        """Post: send ``send`` to the next rank, receive ``recv_specs`` from the previous one.

        With one rank the sent tensors come straight back. Each call with the same ``name``
        receives into the other of two buffers, so the tensors received by the previous call
        may be sent while this call's receive is in flight.
        """
        if self.world_size == 1:
            return PendingExchange([], list(send), [])
        parity = self._parity.get(name, 0)
        received = [self._buffer(name, i, spec) for i, spec in enumerate(recv_specs)]
        self._parity[name] = 1 - parity
        sent = [t.contiguous() for t in send]
        ops = [dist.P2POp(dist.isend, t, self.next_rank, self.group) for t in sent]
        ops += [dist.P2POp(dist.irecv, t, self.prev_rank, self.group) for t in received]
        record_sent(name, sent)
        return PendingExchange(dist.batch_isend_irecv(ops), received, sent)
