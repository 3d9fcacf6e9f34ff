"""The next transfer is posted before the current block is computed; bytes moved match the algorithm."""

import torch
import torch.distributed as dist

from lvx_megatron.launch import spawn_gloo
from lvx_megatron.ops import TorchReferenceBackend, count_communication, distributed_cross_attention
from lvx_megatron.ops import q_allgather as q_allgather_module
from lvx_megatron.ops import ring as ring_module


class RecordingBackend(TorchReferenceBackend):
    def __init__(self, events: list) -> None:
        self.events = events

    def forward(self, *args):
        self.events.append(("compute",))
        return super().forward(*args)

    def backward(self, *args):
        self.events.append(("compute",))
        return super().backward(*args)


def _record_order(rank: int, world_size: int, strategy: str) -> list[tuple]:
    events: list[tuple] = []
    original_exchange = ring_module.Ring.exchange
    original_wait = ring_module.PendingExchange.wait

    def exchange(self, name, send, specs):
        pending = original_exchange(self, name, send, specs)
        pending.trace_id = len(events)  # unique, unlike id() of short-lived objects
        events.append(("post", name, pending.trace_id))
        return pending

    def wait(self):
        events.append(("wait", self.trace_id))
        return original_wait(self)

    ring_module.Ring.exchange = exchange
    ring_module.PendingExchange.wait = wait
    try:
        torch.manual_seed(rank)
        q = torch.randn(1, 3, 4, 8, requires_grad=True)
        k = torch.randn(1, 5, 2, 8, requires_grad=True)
        v = torch.randn(1, 5, 2, 8, requires_grad=True)
        backend = RecordingBackend(events)
        out = distributed_cross_attention(q, k, v, group=dist.group.WORLD, strategy=strategy, backend=backend)
        events.append(("backward",))
        out.sum().backward()
    finally:
        ring_module.Ring.exchange = original_exchange
        ring_module.PendingExchange.wait = original_wait
    return events


def _check_prefetch(events: list[tuple], world_size: int) -> int:
    """Every compute but the last of a pass runs between the post and the wait of the next payload."""
    checked = 0
    for phase in (events[: events.index(("backward",))], events[events.index(("backward",)) + 1 :]):
        computes = [i for i, e in enumerate(phase) if e == ("compute",)]
        assert len(computes) == world_size
        for step, ci in enumerate(computes[:-1]):
            posts = [e for e in phase[:ci] if e[0] == "post" and e[1] == "payload"]
            assert len(posts) == step + 1, f"payload for step {step + 1} not posted before compute {step}"
            handle = posts[-1][2]
            wait_at = phase.index(("wait", handle))
            assert wait_at > ci, f"payload for step {step + 1} was awaited before compute {step} ran"
            checked += 1
    return checked


def test_next_transfer_is_posted_before_compute():
    for strategy in ("query_ring", "kv_ring"):
        for events in spawn_gloo(3, _record_order, strategy):
            assert _check_prefetch(events, 3) == 4


def _record_chunk_pipeline(rank: int, world_size: int, chunks: int) -> list[tuple]:
    """q_allgather in head chunks: the order of collective posts, their waits and the computes."""
    events: list[tuple] = []
    originals = {
        name: getattr(q_allgather_module, name) for name in ("post_all_gather_rows", "post_reduce_scatter_rows")
    }

    def recording(name):
        def post(*args):
            pending = originals[name](*args)
            trace_id, wait = len(events), pending.wait
            events.append(("post", args[-1], trace_id))  # the last argument names the bytes ("q", "o", "dq")

            def traced_wait():
                events.append(("wait", trace_id))
                return wait()

            pending.wait = traced_wait
            return pending

        return post

    for name in originals:
        setattr(q_allgather_module, name, recording(name))
    try:
        torch.manual_seed(rank)
        q = torch.randn(1, 3, 8, 8, requires_grad=True)
        k = torch.randn(1, 5, 4, 8, requires_grad=True)
        v = torch.randn(1, 5, 4, 8, requires_grad=True)
        out = distributed_cross_attention(
            q,
            k,
            v,
            group=dist.group.WORLD,
            strategy="q_allgather",
            backend=RecordingBackend(events),
            head_chunks=chunks,
        )
        events.append(("backward",))
        out.sum().backward()
    finally:
        for name, fn in originals.items():
            setattr(q_allgather_module, name, fn)
    return events


def test_q_allgather_chunks_overlap_collectives_with_compute():
    chunks = 3  # 4 K/V heads: chunks of 2, 1 and 1
    for events in spawn_gloo(3, _record_chunk_pipeline, chunks):
        split = events.index(("backward",))
        for phase, scatter in ((events[:split], "o"), (events[split + 1 :], "dq")):
            computes = [i for i, e in enumerate(phase) if e == ("compute",)]
            gathers = [e for e in phase if e[:2] == ("post", "q")]
            scatters = [e for e in phase if e[:2] == ("post", scatter)]
            assert len(computes) == len(gathers) == len(scatters) == chunks
            for c in range(chunks - 1):
                # chunk c + 1's all-gather is in flight while chunk c computes ...
                posted, awaited = phase.index(gathers[c + 1]), phase.index(("wait", gathers[c + 1][2]))
                assert posted < computes[c] < awaited, (c, phase)
                # ... and chunk c's reduce-scatter while chunk c + 1 computes.
                posted, awaited = phase.index(scatters[c]), phase.index(("wait", scatters[c][2]))
                assert posted < computes[c + 1] < awaited, (c, phase)


def _bytes_moved(rank: int, world_size: int, strategy: str) -> dict[str, int]:
    b, sq, hq, hkv, d, skv = 2, 6, 8, 2, 16, 40
    q = torch.randn(b, sq, hq, d, requires_grad=True)
    k = torch.randn(b, skv, hkv, d, requires_grad=True)
    v = torch.randn(b, skv, hkv, d, requires_grad=True)
    with count_communication() as fwd:
        out = distributed_cross_attention(q, k, v, group=dist.group.WORLD, strategy=strategy)
    with count_communication() as bwd:
        out.sum().backward()
    return {"fwd": fwd.bytes_sent, "bwd": bwd.bytes_sent}


def test_bytes_moved_per_rank_match_the_algorithm():
    n, b, sq, hq, hkv, d, skv = 4, 2, 6, 8, 2, 16, 40
    q_elems, stat_elems, kv_elems = b * sq * hq * d, b * sq * hq, b * skv * hkv * d
    # fp32 everywhere on CPU. Query ring: Q travels n-1 hops, (O, LSE) n hops (the last to the
    # owner); backward: (Q, dO, LSE, D) n-1 hops, dQ n hops; dK/dV never move.
    expected = {
        "query_ring": {
            "fwd": 4 * ((n - 1) * q_elems + n * (q_elems + stat_elems)),
            "bwd": 4 * ((n - 1) * (2 * q_elems + 2 * stat_elems) + n * q_elems),
        },
        # Q all-gather (ring-algorithm counts): Q to n-1 ranks, two all-reduces of the LSE of all
        # n blocks (2 (n-1)/n each), reduce-scatter of fp32 O; backward gathers Q, dO, LSE, D and
        # reduce-scatters dQ.
        "q_allgather": {
            "fwd": 4 * ((n - 1) * q_elems + (n - 1) * q_elems) + 2 * (2 * (n - 1) * 4 * n * stat_elems) // n,
            "bwd": 4 * ((n - 1) * (2 * q_elems + 2 * stat_elems) + (n - 1) * q_elems),
        },
        # KV all-gather: K, V to n-1 ranks, twice (backward gathers again), dK, dV reduce-scattered.
        "kv_allgather": {
            "fwd": 4 * (n - 1) * 2 * kv_elems,
            "bwd": 4 * ((n - 1) * 2 * kv_elems + (n - 1) * 2 * kv_elems),
        },
        # KV ring: K, V travel n-1 hops; backward adds dK, dV for n hops.
        "kv_ring": {"fwd": 4 * (n - 1) * 2 * kv_elems, "bwd": 4 * ((n - 1) * 2 * kv_elems + n * 2 * kv_elems)},
    }
    for strategy, want in expected.items():
        for got in spawn_gloo(n, _bytes_moved, strategy):
            assert got == want, strategy
