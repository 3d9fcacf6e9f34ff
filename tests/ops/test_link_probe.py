"""The start-up link probe measures a link of known latency and bandwidth, and every rank agrees."""

import math
import time

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


class _SlowExchange:
    """The works of one exchange, finishing ``seconds`` after they complete (a work is waited once)."""

    def __init__(self, works: list, seconds: float) -> None:
        self.works, self.seconds = works, seconds

    def wait(self) -> None:
        for work in self.works:
            work.wait()
        time.sleep(self.seconds)


def _probe_slow_link(rank: int, world_size: int) -> dict[str, Link]:
    """Worker: every ring exchange of this rank takes its injected ``latency + bytes / bandwidth`` longer."""
    exchange = dist.batch_isend_irecv

    def slow_exchange(ops: list) -> list:
        nbytes = max(op.tensor.numel() * op.tensor.element_size() for op in ops)
        return [_SlowExchange(exchange(ops), LATENCY_S[rank] + nbytes / BANDWIDTH[rank])]

    dist.batch_isend_irecv = slow_exchange  # what probe_link calls; this process ends after the probes
    alone = dist.new_group([0]), dist.new_group([1])  # collective: every rank creates both
    return {
        "ring": probe_link(large_bytes=LARGE, repeats=3),
        # Groups of one rank have nothing to measure; agreeing over the world keeps that.
        "alone": probe_link(alone[rank], agree_over=dist.group.WORLD, large_bytes=LARGE, repeats=3),
    }


def test_probe_measures_the_slowest_link_on_every_rank():
    results = spawn_gloo(2, _probe_slow_link)
    ring = results[0]["ring"]
    assert results[1]["ring"] == ring
    # The largest latency (rank 0's, plus gloo's own small-message time) and the smallest bandwidth
    # (rank 1's): the large message's extra time over the small one's is its bytes / bandwidth
    # (the large message's whole time would give 7.8 MB/s).
    assert max(LATENCY_S) < ring.latency < max(LATENCY_S) + 0.02, ring
    assert ring.bandwidth == pytest.approx(min(BANDWIDTH), rel=0.1), ring
    assert all(r["alone"] == Link(bandwidth=math.inf, latency=0.0) for r in results)


def test_probe_needs_distributed_and_sane_sizes():
    with pytest.raises(ValueError, match=r"needs torch\.distributed to be initialised"):
        probe_link()
    with pytest.raises(ValueError, match="0 < small_bytes < large_bytes, got 64, 64"):
        probe_link(large_bytes=64)
    with pytest.raises(ValueError, match="repeats must be >= 1, got 0"):
        probe_link(repeats=0)
