"""A short start-up measurement of a process group's link, for the cost model.

Every rank sends a buffer to the next rank and receives one from the previous, the traffic of a
ring strategy step with every link busy at once, a few times at a small and at a large size. The
median small-message time is the latency; the large message's extra time gives the bandwidth.
The ranks then agree on the slowest: the largest latency and the smallest bandwidth.
"""

import math
import statistics
import time
from collections.abc import Callable

import torch
import torch.distributed as dist

from .cost_model import Link

SMALL_BYTES = 64
LARGE_BYTES = 8 << 20  # large enough that bandwidth, not latency, dominates on NVLink
REPEATS = 5


def _ring_exchange_seconds(
    group: dist.ProcessGroup | None,
    send: torch.Tensor,
    recv: torch.Tensor,
    sync: Callable[[], None],
    clock: Callable[[], float],
) -> float:
    """Seconds of one send to the next rank and receive from the previous, started together."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    whole = group or dist.group.WORLD
    next_rank = dist.get_global_rank(whole, (rank + 1) % world)
    prev_rank = dist.get_global_rank(whole, (rank - 1) % world)
    ready = torch.zeros(1, device=send.device)
    dist.all_reduce(ready, group=group)  # every rank has arrived before the clock starts
    sync()
    start = clock()
    ops = [dist.P2POp(dist.isend, send, next_rank, group), dist.P2POp(dist.irecv, recv, prev_rank, group)]
    for work in dist.batch_isend_irecv(ops):
        work.wait()
    sync()
    return clock() - start


def probe_link(
    group: dist.ProcessGroup | None = None,
    *,
    agree_over: dist.ProcessGroup | None = None,
    small_bytes: int = SMALL_BYTES,
    large_bytes: int = LARGE_BYTES,
    repeats: int = REPEATS,
    clock: Callable[[], float] = time.perf_counter,
) -> Link:
    """Measure ``group``'s ring link (None: the default group); every rank gets the same :class:`Link`.

    Collective over ``group``, then over ``agree_over`` (default ``group``), whose ranks all get
    the slowest of their measurements: pass the whole group when several subgroups (the nodes of a
    two-level group) are probed at once and must reach one choice. A group of one rank has nothing
    to measure: it contributes infinite bandwidth and zero latency. Not counted by
    ``count_communication``. ``clock``: seconds.
    """
    if not 0 < small_bytes < large_bytes:
        raise ValueError(
            f"small_bytes and large_bytes must satisfy 0 < small_bytes < large_bytes, got {small_bytes}, {large_bytes}"
        )
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("probe_link needs torch.distributed to be initialised")
    cuda = dist.get_backend(group) == "nccl"
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    sync = torch.cuda.synchronize if cuda else lambda: None
    latency = inverse_bandwidth = 0.0
    if dist.get_world_size(group) > 1:
        buffers = []
        for nbytes in (small_bytes, large_bytes):
            send = torch.ones(nbytes, dtype=torch.uint8, device=device)
            buffers.append((send, torch.empty_like(send)))
        for _ in range(2):  # warm-up: connections and threads are set up lazily
            for send, recv in buffers:
                _ring_exchange_seconds(group, send, recv, sync, clock)
        # Interleaved, so that a slow spell of the machine affects both sizes alike.
        times = [
            [_ring_exchange_seconds(group, send, recv, sync, clock) for send, recv in buffers] for _ in range(repeats)
        ]
        medians = [statistics.median(column) for column in zip(*times, strict=True)]
        latency = medians[0]
        extra = medians[1] - medians[0]
        # Noise can make the large exchange look no slower than the small one; then count it whole.
        inverse_bandwidth = (extra / (large_bytes - small_bytes)) if extra > 0 else medians[1] / large_bytes
    slowest = torch.tensor([latency, inverse_bandwidth], dtype=torch.float64, device=device)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX, group=group if agree_over is None else agree_over)
    latency, inverse_bandwidth = slowest.tolist()
    return Link(bandwidth=1.0 / inverse_bandwidth if inverse_bandwidth > 0 else math.inf, latency=latency)
