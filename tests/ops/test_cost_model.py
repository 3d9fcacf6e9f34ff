"""The cost model: its byte counts equal the implementation's, and its choices make sense."""

import pytest
from cases import auto_choice, measured_and_predicted_bytes

from lvx_megatron.launch import spawn_gloo
from lvx_megatron.ops.auto import choose_strategy, predict, predicted_bytes
from lvx_megatron.ops.cost_model import CallShape, ComputeModel, Link, Topology, uniform_lengths

# H100-like rates (forward, forward+backward FLOP/s) on a 2 x 2 (sq, skv) grid; GQA 32/32 at a quarter
# of 32/8's rates, so a group of 2 interpolates to half of them.
GRID_32_8 = {(64, 4096): (60e12, 50e12), (64, 65536): (200e12, 180e12), (4096, 4096): (500e12, 450e12)}
GRID_32_8[(4096, 65536)] = (600e12, 550e12)
GRID_32_32 = {key: (f / 4, b / 4) for key, (f, b) in GRID_32_8.items()}
H100_TABLE = ComputeModel({(32, 8, 128): GRID_32_8, (32, 32, 128): GRID_32_32})
NVLINK, ETHERNET = Link(bandwidth=150e9, latency=5e-6), Link(bandwidth=3e9, latency=30e-6)


@pytest.mark.parametrize("world_size", [2, 3])
def test_predicted_bytes_equal_the_bytes_sent(world_size):
    for rank, rows in enumerate(spawn_gloo(world_size, measured_and_predicted_bytes, 40 + world_size)):
        assert any(case.head_chunks for case, _, _ in rows)
        for case, measured, predicted in rows:
            assert measured == predicted, (case, rank, world_size)


def _shape(text: int, visual: int, n: int, q_heads: int = 32, kv_heads: int = 8, **fields) -> CallShape:
    return CallShape(uniform_lengths(text, n), uniform_lengths(visual, n), 1, q_heads, kv_heads, 128, **fields)


@pytest.mark.parametrize(
    "text, visual, n, link, best",
    [
        (512, 400_000, 16, ETHERNET, "query_ring"),  # long video, slow links: move the small queries
        (4096, 400_000, 16, NVLINK, "q_allgather"),  # longer text, fast links: gather once, large blocks
        (16384, 2048, 16, NVLINK, "kv_ring"),  # self-attention-like (long queries, short keys): move K/V
        (1024, 2048, 2, ETHERNET, "kv_allgather"),  # little K/V on two ranks: one all-gather
    ],
)
def test_each_strategy_wins_its_regime(text, visual, n, link, best):
    chosen, predictions = choose_strategy(_shape(text, visual, n), link, H100_TABLE)
    runner_up = min(p.total_s for name, p in predictions.items() if name != chosen)
    assert chosen == best and predictions[best].total_s < runner_up / 1.25, {
        k: p.total_s for k, p in predictions.items()
    }


def test_query_ring_moves_a_fraction_of_the_kv_ring_bytes():
    predictions = choose_strategy(_shape(512, 400_000, 16), ETHERNET, H100_TABLE)[1]
    assert predictions["query_ring"].total_s < predictions["kv_ring"].total_s / 5
    assert predictions["kv_ring"].forward_bytes > 20 * predictions["query_ring"].forward_bytes


def _rates(model: ComputeModel, hq: int, hkv: int, d: int = 128, sq: int = 64, skv: int = 4096) -> tuple[float, float]:
    return model.rates_at(hq, kv_heads=hkv, head_dim=d, sq=sq, skv=skv)


def test_rates_of_the_calls_own_heads_or_interpolated_in_the_group_size():
    # Measured: the rows of that configuration, at grid points and between them (log-log in sq, skv).
    grid_16_8 = {key: (f * 0.9, b * 0.9) for key, (f, b) in GRID_32_8.items()}
    with_16_8 = ComputeModel({**H100_TABLE.rates, (16, 8, 128): grid_16_8})
    assert _rates(with_16_8, 16, 8) == pytest.approx((54e12, 45e12), rel=1e-12)
    middle = (60 * 200 * 500 * 600) ** 0.25 * 1e12, (50 * 180 * 450 * 550) ** 0.25 * 1e12  # sq 512, skv 16384
    assert _rates(with_16_8, 16, 8, sq=512, skv=16384) == pytest.approx((0.9 * middle[0], 0.9 * middle[1]), rel=1e-12)
    assert _rates(H100_TABLE, 32, 8, sq=512, skv=16384) == pytest.approx(middle, rel=1e-12)
    # Not measured: 16/8 is group 2, halfway (in log) between 32/32 (group 1) and 32/8 (group 4).
    assert _rates(H100_TABLE, 16, 8) == pytest.approx((60e12 / 2, 50e12 / 2), rel=1e-12)
    assert _rates(H100_TABLE, 16, 8, sq=512, skv=16384) == pytest.approx((middle[0] / 2, middle[1] / 2), rel=1e-12)
    # Groups outside the measured ones are clamped; another query-head count uses the nearest measured one.
    assert _rates(H100_TABLE, 32, 4) == _rates(H100_TABLE, 64, 16) == pytest.approx((60e12, 50e12), rel=1e-12)
    # Head dim: the nearest measured (log distance), 64 for 80 against 128.
    grid_d64 = {key: (f / 3, b / 3) for key, (f, b) in GRID_32_8.items()}
    two_dims = ComputeModel({(32, 8, 128): GRID_32_8, (32, 8, 64): grid_d64})
    assert _rates(two_dims, 32, 8, d=80) == pytest.approx((20e12, 50e12 / 3), rel=1e-12)
    assert _rates(two_dims, 32, 8, d=112) == pytest.approx((60e12, 50e12), rel=1e-12)


def test_compute_model_checks_its_table():
    with pytest.raises(ValueError, match=r"the \(sq, skv\) grid lacks \[\(4096, 65536\)\]"):
        ComputeModel({(32, 8, 128): {k: v for k, v in GRID_32_8.items() if k != (4096, 65536)}})
    with pytest.raises(ValueError, match="either measured rates or a flat rate"):
        ComputeModel()
    flat = ComputeModel(flat=(2e10, 1e10))
    assert _rates(flat, 16, 8, sq=7, skv=9) == (2e10, 1e10)


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
    one, four = (_shape(2048, 400_000, 4, head_chunks=c) for c in (1, 4))
    p1, p4 = (predict("q_allgather", s, ETHERNET, H100_TABLE) for s in (one, four))
    assert p4.total_s < 0.8 * p1.total_s
    # The same bytes, up to the rounding of one LSE all-reduce per chunk.
    assert p4.backward_bytes == p1.backward_bytes and abs(p4.forward_bytes - p1.forward_bytes) < 4
    assert predict("q_allgather", _shape(2048, 400_000, 4), ETHERNET, H100_TABLE) == p4  # the default: 4 chunks


def test_auto_reaches_one_choice_on_every_rank():
    # CPU (flat rate) over gloo's default link; the winners lead the runners-up by over 1.3x.
    assert spawn_gloo(2, auto_choice, 6, 1000) == ["query_ring"] * 2
    assert spawn_gloo(2, auto_choice, 1000, 12) == ["kv_ring"] * 2


def test_simulator_prints_every_strategy_and_draws_the_speedup(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    png = tmp_path / "speedup.png"
    args = ["--config", str(repo / "examples/configs/llama-3.2-11b-vision.yaml"), "--frames", "64", "--nodes", "4"]
    args += ["--gpus-per-node", "4", "--inter-gbps", "25", "--gpu", "a100", "--mask", "none"]
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
