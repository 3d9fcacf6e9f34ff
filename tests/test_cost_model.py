"""The cost model: its byte counts equal the implementation's, and its choices make sense."""

import pytest
from cases import auto_choice, measured_and_predicted_bytes

from lvx_megatron.launch import spawn_gloo
from lvx_megatron.ops.cost_model import (
    CallShape,
    ComputeModel,
    Link,
    Topology,
    choose_strategy,
    predict,
    predicted_bytes,
    uniform_lengths,
)

H100_TABLE = ComputeModel(
    {(64, 16384): (88e12, 58e12), (1024, 65536): (646e12, 561e12), (4096, 4096): (600e12, 540e12)}
)
NVLINK, ETHERNET = Link(bandwidth=150e9, latency=5e-6), Link(bandwidth=3e9, latency=30e-6)


@pytest.mark.parametrize("world_size", [2, 3])
def test_predicted_bytes_equal_the_bytes_sent(world_size):
    for rank, rows in enumerate(spawn_gloo(world_size, measured_and_predicted_bytes, 40 + world_size)):
        assert any(case.head_chunks for case, _, _ in rows)
        for case, measured, predicted in rows:
            assert measured == predicted, (case, rank, world_size)


def _shape(text: int, visual: int, n: int, q_heads: int = 32, kv_heads: int = 8, **fields) -> CallShape:
    return CallShape(uniform_lengths(text, n), uniform_lengths(visual, n), 1, q_heads, kv_heads, 128, **fields)


def test_query_ring_when_visual_tokens_dominate():
    best, predictions = choose_strategy(_shape(2048, 400_000, 8), ETHERNET, H100_TABLE)
    assert best in ("query_ring", "q_allgather")
    assert predictions["query_ring"].total_s < predictions["kv_ring"].total_s / 5
    assert predictions["kv_ring"].forward_bytes > 20 * predictions["query_ring"].forward_bytes


def test_kv_ring_for_self_attention_like_shapes():
    # Long queries, short keys (each rank's K/V block smaller than its query block): move K/V.
    best, predictions = choose_strategy(_shape(65536, 8192, 8, kv_heads=8), ETHERNET, H100_TABLE)
    assert best in ("kv_ring", "kv_allgather")
    assert predictions["kv_ring"].total_s < predictions["query_ring"].total_s


def test_one_rank_moves_nothing_and_picks_the_query_ring():
    best, predictions = choose_strategy(_shape(512, 4096, 1), NVLINK, H100_TABLE)
    assert best == "query_ring" and all(p.forward_bytes == p.backward_bytes == 0 for p in predictions.values())


def test_faster_links_never_predict_slower_steps():
    shape = _shape(1024, 131072, 4)
    for name in ("query_ring", "kv_ring", "q_allgather", "kv_allgather"):
        assert predict(name, shape, NVLINK, H100_TABLE).total_s <= predict(name, shape, ETHERNET, H100_TABLE).total_s
    fast, slow = Topology(2, NVLINK, NVLINK), Topology(2, NVLINK, ETHERNET)
    assert (
        predict("hierarchical", shape, fast, H100_TABLE).total_s
        <= predict("hierarchical", shape, slow, H100_TABLE).total_s
    )


def test_hierarchical_when_nodes_are_linked_slowly():
    # 4 nodes of 8 GPUs, NVLink inside, Ethernet between; 2048 text tokens against 400K visual ones.
    shape = _shape(2048, 400_000, 32)
    best, predictions = choose_strategy(shape, Topology(8, NVLINK, ETHERNET), H100_TABLE)
    assert best == "hierarchical", {name: p.total_s for name, p in predictions.items()}
    hierarchical = predictions["hierarchical"]
    assert (hierarchical.forward_bytes, hierarchical.backward_bytes) == predicted_bytes("hierarchical", shape, 0, 8)
    # Without a topology it is no candidate; with NVLink everywhere the flat strategies are at least as fast.
    assert "hierarchical" not in choose_strategy(shape, ETHERNET, H100_TABLE)[1]
    assert choose_strategy(shape, Topology(8, NVLINK, NVLINK), H100_TABLE)[0] != "hierarchical"
    with pytest.raises(ValueError, match="strategy 'hierarchical' needs link=Topology"):
        predict("hierarchical", shape, ETHERNET, H100_TABLE)
    with pytest.raises(ValueError, match=r"needs ranks_per_node, a positive divisor of the world size \(32\), got 5"):
        predicted_bytes("hierarchical", shape, 0, 5)


def test_q_allgather_chunks_hide_communication():
    # Slow links: the collectives take about as long as the compute.
    one, four = (_shape(2048, 400_000, 8, head_chunks=c) for c in (1, 4))
    p1, p4 = (predict("q_allgather", s, ETHERNET, H100_TABLE) for s in (one, four))
    assert p4.total_s < 0.8 * p1.total_s
    # The same bytes, up to the rounding of one LSE all-reduce per chunk.
    assert p4.backward_bytes == p1.backward_bytes and abs(p4.forward_bytes - p1.forward_bytes) < 4
    assert predict("q_allgather", _shape(2048, 400_000, 8), ETHERNET, H100_TABLE) == p4  # the default: 4 chunks


def test_auto_reaches_one_choice_on_every_rank():
    (long_video,) = set(spawn_gloo(3, auto_choice, 24, 30000))
    (self_like,) = set(spawn_gloo(3, auto_choice, 30000, 24))
    assert long_video in ("query_ring", "q_allgather") and self_like in ("kv_ring", "kv_allgather")


def test_simulator_prints_every_strategy_and_draws_the_speedup(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    png = tmp_path / "speedup.png"
    args = ["--config", str(repo / "examples/configs/llama-3.2-11b-vision.yaml"), "--frames", "64", "--nodes", "4"]
    args += ["--gpus-per-node", "4", "--inter-gbps", "25", "--gpu", "a100", "--kernel", "fused/auto"]
    proc = subprocess.run(
        [sys.executable, str(repo / "tools/simulate_xattn.py"), *args, "--plot", str(png)],
        capture_output=True,
        text=True,
        check=True,
    )
    lines = proc.stdout.splitlines()
    assert "409856 visual tokens" in lines[0] and "16 A100s (4 x 4)" in lines[0] and "25 GB/s between nodes" in lines[0]
    rows = {line.split()[0]: line.split() for line in lines[2:7]}
    assert set(rows) == {"query_ring", "kv_ring", "q_allgather", "kv_allgather", "hierarchical"}
    assert float(rows["kv_ring"][2]) > 20 * float(rows["query_ring"][2])  # MB per GPU per layer
    assert sum("<- auto" in line for line in lines) == 1
    assert png.stat().st_size > 10_000 and png.read_bytes()[:4] == b"\x89PNG"
