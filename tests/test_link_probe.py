"""The start-up link probe: positive, finite numbers that every rank agrees on."""

import math

import pytest
import torch.distributed as dist

from lvx_megatron.launch import spawn_gloo
from lvx_megatron.ops.cost_model import Link
from lvx_megatron.ops.link_probe import probe_link


def _probe(rank: int, world_size: int) -> dict[str, Link]:
    links = {"whole": probe_link(large_bytes=1 << 20, repeats=3)}
    # Subgroups probed at once (ranks 0-1, and the rest: one rank with nothing to measure when
    # world_size is 3), agreeing over the whole group.
    low, high = dist.new_group([0, 1]), dist.new_group(list(range(2, world_size)) or [0])
    mine = low if rank < 2 else high
    links["subgroups"] = probe_link(mine, agree_over=dist.group.WORLD, large_bytes=1 << 20, repeats=3)
    return links


@pytest.mark.parametrize("world_size", [2, 3])
def test_probe_measures_one_link_on_every_rank(world_size):
    results = spawn_gloo(world_size, _probe)
    for key in ("whole", "subgroups"):
        links = [r[key] for r in results]
        assert len(set(links)) == 1, (key, links)
        link = links[0]
        assert 0 < link.latency < 1 and 0 < link.bandwidth < math.inf, (key, link)


def test_probe_needs_distributed_and_sane_sizes():
    with pytest.raises(ValueError, match=r"needs torch\.distributed to be initialised"):
        probe_link()
    with pytest.raises(ValueError, match="0 < small_bytes < large_bytes, got 64, 64"):
        probe_link(large_bytes=64)
    with pytest.raises(ValueError, match="repeats must be >= 1, got 0"):
        probe_link(repeats=0)
