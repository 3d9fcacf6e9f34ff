"""The mllama-style decoder block under (TP, CP, PP) layouts equals the single-process run."""

import pytest
import torch
from block_harness import run_block

from lvx_megatron.launch import spawn_gloo

TOLERANCE = 2e-5  # fp32; reduction orders differ between layouts


def _rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    assert torch.isfinite(x).all()
    return float((x - ref).norm() / ref.norm().clamp_min(1e-12))


@pytest.fixture(scope="module")
def reference():
    return spawn_gloo(1, run_block, 1, 1, 1)[0]


def _check_layout(results: list[dict], reference: dict) -> None:
    covered = set()
    for r in results:
        assert abs(r["loss"] - reference["loss"]) <= TOLERANCE * abs(reference["loss"])
        for name, grad in r["grads"].items():
            covered.add(name)
            assert _rel(grad, reference["grads"][name]) < TOLERANCE, (name, r["rank"])
        for (start, length, grad), (_, _, ref) in zip(r["dx"], reference["dx"], strict=True):
            assert _rel(grad, ref[start : start + length]) < TOLERANCE, ("dX", r["rank"])
        for (start, length, grad), (_, _, ref) in zip(r["dh"], reference["dh"] if r["dh"] else [], strict=True):
            assert _rel(grad, ref[start : start + length]) < TOLERANCE, ("dH", r["rank"])
    assert covered == set(reference["grads"]), "every parameter is checked on some stage"


@pytest.mark.parametrize("tp, cp, pp", [(2, 1, 1), (1, 2, 1), (1, 3, 1), (2, 2, 1), (1, 2, 2), (2, 2, 2)])
def test_parallel_layouts_match_single_process(tp, cp, pp, reference):
    _check_layout(spawn_gloo(tp * cp * pp, run_block, tp, cp, pp), reference)


def test_without_visual_kv_recompute_gradients_are_the_same(reference):
    _check_layout(spawn_gloo(2, run_block, 1, 2, 1, False), reference)


# CP 4 as 2 nodes x 2: a fast link inside a node, a slow high-latency one between nodes (auto must
# then pick hierarchical), and the links measured at the first call.
TWO_NODES = dict(cross_attention_ranks_per_node=2)
SLOW_BETWEEN_NODES = dict(
    TWO_NODES, cross_attention_inner_link_gbps=100.0, cross_attention_link_gbps=1.0, cross_attention_link_latency_us=1e5
)


def _two_level_runs(rank: int, world_size: int) -> dict[str, dict]:
    runs = {
        "hierarchical": dict(TWO_NODES, cross_attention_strategy="hierarchical"),
        "auto": dict(SLOW_BETWEEN_NODES, cross_attention_strategy="auto"),
        "auto, probed links": dict(TWO_NODES, cross_attention_strategy="auto", cross_attention_link="probe"),
    }
    return {name: run_block(rank, world_size, 1, 4, 1, True, 0, overrides) for name, overrides in runs.items()}


def test_hierarchical_over_two_nodes_matches_single_process(reference):
    results = spawn_gloo(4, _two_level_runs)
    for name in ("hierarchical", "auto", "auto, probed links"):
        runs = [r[name] for r in results]
        _check_layout(runs, reference)
        assert len({tuple(r["strategies"]) for r in runs}) == 1, (name, [r["strategies"] for r in runs])
    assert all(r["hierarchical"]["strategies"] == ["hierarchical"] * 2 for r in results)
    assert all(r["auto"]["strategies"] == ["hierarchical"] * 2 for r in results)
