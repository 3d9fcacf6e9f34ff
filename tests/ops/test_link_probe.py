"""The start-up link probe measures a link of known latency and bandwidth, and every rank agrees.

The injected link is time on a fake clock that the probe reads, so the measurement is exact whatever
the machine's load (gloo's own time on one machine does not count).
"""

import math

import pytest
import torch.distributed as dist

from lvx_megatron.launch import spawn_gloo
from lvx_megatron.ops.cost_model import Link
from lvx_megatron.ops.link_probe import probe_link

# Per rank: an injected latency and bandwidth far slower than gloo on one machine, so they dominate;
# the slowest latency and the slowest bandwidth are on different ranks.
LATENCY_S = (0.06, 0.03)
BANDWIDTH = (20e6, 10e6)  # bytes/s: 1 MiB takes 52 and 105 ms
LARGE = 1 << 20


class _Clock:
    """Seconds that pass only through the injected link."""

    now = 0.0

    def __call__(self) -> float:
        return self.now


class _SlowExchange:
    """The works of one exchange, finishing ``seconds`` after they complete (a work is waited once)."""

    def __init__(self, works: list, seconds: float, clock: _Clock) -> None:
        self.works, self.seconds, self.clock = works, seconds, clock

    def wait(self) -> None:
        for work in self.works:
            work.wait()
        self.clock.now += self.seconds


def _probe_slow_link(rank: int, world_size: int) -> dict[str, Link]:
    """Worker: every ring exchange of this rank takes its injected ``latency + bytes / bandwidth`` longer."""
    exchange, clock = dist.batch_isend_irecv, _Clock()

    def slow_exchange(ops: list) -> list:
        nbytes = max(op.tensor.numel() * op.tensor.element_size() for op in ops)
        return [_SlowExchange(exchange(ops), LATENCY_S[rank] + nbytes / BANDWIDTH[rank], clock)]

    dist.batch_isend_irecv = slow_exchange  # what probe_link calls; this process ends after the probes
    alone = dist.new_group([0]), dist.new_group([1])  # collective: every rank creates both
    return {
        "ring": probe_link(large_bytes=LARGE, repeats=3, clock=clock),
        # Groups of one rank have nothing to measure; agreeing over the world keeps that.
        "alone": probe_link(alone[rank], agree_over=dist.group.WORLD, large_bytes=LARGE, repeats=3, clock=clock),
    }


def test_probe_measures_the_slowest_link_on_every_rank():
    results = spawn_gloo(2, _probe_slow_link)
    ring = results[0]["ring"]
    assert results[1]["ring"] == ring
    # The largest latency (rank 0's: its small message's time) and the smallest bandwidth (rank 1's):
    # the large message's extra time over the small one's is its bytes / bandwidth (the large
    # message's whole time would give 7.8 MB/s).
    assert ring.latency == pytest.approx(LATENCY_S[0] + 64 / BANDWIDTH[0], rel=1e-9), ring
    assert ring.bandwidth == pytest.approx(min(BANDWIDTH), rel=1e-9), ring
    assert all(r["alone"] == Link(bandwidth=math.inf, latency=0.0) for r in results)


def test_probe_needs_distributed_and_sane_sizes():
    with pytest.raises(ValueError, match=r"needs torch\.distributed to be initialised"):
        probe_link()
    with pytest.raises(ValueError, match="0 < small_bytes < large_bytes, got 64, 64"):
        probe_link(large_bytes=64)
    with pytest.raises(ValueError, match="repeats must be >= 1, got 0"):
        probe_link(repeats=0)
