"""The cost model: its byte counts equal the implementation's, and its choices make sense."""

import pytest
from cases import auto_choice, measured_and_predicted_bytes

from lvx_megatron.launch import spawn_gloo
from lvx_megatron.ops.cost_model import CallShape, ComputeModel, Link, choose_strategy, predict, uniform_lengths

H100_TABLE = ComputeModel(
    {(64, 16384): (88e12, 58e12), (1024, 65536): (646e12, 561e12), (4096, 4096): (600e12, 540e12)}
)
NVLINK, ETHERNET = Link(bandwidth=150e9, latency=5e-6), Link(bandwidth=3e9, latency=30e-6)


@pytest.mark.parametrize("world_size", [2, 3])
def test_predicted_bytes_equal_the_bytes_sent(world_size):
    for rank, rows in enumerate(spawn_gloo(world_size, measured_and_predicted_bytes, 40 + world_size)):
        for strategy, masks, measured, predicted in rows:
            assert measured == predicted, (strategy, masks, rank, world_size)


def _shape(text: int, visual: int, n: int, q_heads: int = 32, kv_heads: int = 8) -> CallShape:
    return CallShape(uniform_lengths(text, n), uniform_lengths(visual, n), 1, q_heads, kv_heads, 128, num_ids=8)


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
    assert "409856 visual tokens" in lines[0] and "16 A100s" in lines[0]
    rows = {line.split()[0]: line.split() for line in lines[2:6]}
    assert set(rows) == {"query_ring", "kv_ring", "q_allgather", "kv_allgather"}
    assert float(rows["kv_ring"][2]) > 20 * float(rows["query_ring"][2])  # MB per GPU per layer
    assert sum("<- auto" in line for line in lines) == 1
    assert png.stat().st_size > 10_000 and png.read_bytes()[:4] == b"\x89PNG"
