"""The hierarchical strategy (q_allgather inside a node, query ring across nodes) on gloo ranks."""

import functools
import itertools
import math

import pytest
import torch
import torch.distributed as dist
from cases import Case, counted_bytes, make_problem, run_case

from lvx_megatron.launch import spawn_gloo
from lvx_megatron.ops import count_communication, distributed_cross_attention
from lvx_megatron.ops.auto import predicted_bytes
from lvx_megatron.ops.cost_model import CallShape
from lvx_megatron.ops.groups import HierarchicalGroups, hierarchical_groups
from lvx_megatron.ops.hierarchical import predicted_level_bytes

TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5}


def _matrix(world_size: int, ranks_per_node: int) -> list[Case]:
    return [
        Case("hierarchical", 8, hkv, masks, dtype, seed=7000 + 100 * world_size + 10 * ranks_per_node + i)
        for i, (hkv, masks, dtype) in enumerate(
            itertools.product((8, 2, 1), ("none", "padding", "images"), (torch.float64, torch.float32))
        )
    ]


def _split(total: int, nonzero: list[bool]) -> list[int]:
    """``total`` rows over the ranks marked True, as evenly as possible; 0 for the others."""
    owners = [r for r, keep in enumerate(nonzero) if keep]
    lens = [0] * len(nonzero)
    for i, r in enumerate(owners):
        lens[r] = total // len(owners) + (i < total % len(owners))
    return lens


def _accuracy(rank: int, world_size: int, ranks_per_node: int, groups: HierarchicalGroups):
    assert (groups.node, groups.local_rank) == divmod(rank, ranks_per_node)
    results = [(case, run_case(case, rank, world_size, groups)) for case in _matrix(world_size, ranks_per_node)]
    # Node 0 without any text rows and local column 0 without visual tokens (uneven elsewhere).
    has_q = [r >= ranks_per_node for r in range(world_size)]
    has_kv = [r % ranks_per_node != 0 for r in range(world_size)]
    for i, (masks, dtype) in enumerate(itertools.product(("none", "images"), (torch.float64, torch.float32))):
        case = Case("hierarchical", 8, 2, masks, dtype, seed=9000 + 10 * world_size + i)
        prob = make_problem(case, world_size)
        lengths = (_split(sum(prob["q_lens"]), has_q), _split(sum(prob["kv_lens"]), has_kv))
        results.append((case, run_case(case, rank, world_size, groups, lengths)))
    return results


# Spawning gloo ranks costs ~10 s on 2 cores, so one spawn per world size runs every layout.
LAYOUTS = {4: (2,), 6: (2, 3)}  # world size: ranks per node (4 = 2x2; 6 = 3 nodes x 2 and 2 x 3)


def _worker(rank: int, world_size: int, layouts: tuple[int, ...]) -> dict:
    results = {}
    for ranks_per_node in layouts:
        groups = hierarchical_groups(ranks_per_node)
        results[ranks_per_node] = {
            "accuracy": _accuracy(rank, world_size, ranks_per_node, groups),
            "bytes": _bytes(rank, world_size, ranks_per_node, groups),
            "levels": _level_bytes(rank, world_size, ranks_per_node, groups),
        }
    if world_size == 6:
        # Two-level groups of a subgroup: ranks 0-3 as 2 nodes x 2; only its members split it.
        parent = dist.new_group([0, 1, 2, 3])
        if rank < 4:
            groups = hierarchical_groups(2, parent)
            assert groups.parent is parent and (groups.node, groups.local_rank) == divmod(rank, 2)
            results["subgroup"] = [
                (case, run_case(case, rank, 4, groups))
                for case in (
                    Case("hierarchical", 8, 2, "images", torch.float64, seed=31),
                    Case("hierarchical", 4, 1, "padding", torch.float32, seed=32),
                )
            ]
    return results


@functools.cache
def _results(world_size: int) -> list[dict]:
    return spawn_gloo(world_size, _worker, LAYOUTS[world_size])


@pytest.mark.parametrize("world_size, ranks_per_node", [(4, 2), (6, 2), (6, 3)])
def test_hierarchical_matches_float64_reference(world_size, ranks_per_node):
    checked = 0
    for rank, rank_results in enumerate(_results(world_size)):
        for case, errs in rank_results[ranks_per_node]["accuracy"]:
            for name, err in errs.items():
                assert not math.isnan(err), f"NaN in {name}: {case} rank {rank}"
                limit = 0.0 if name == "blind_row_max" else TOLERANCE[case.dtype]
                assert err <= limit, f"{name} error {err:.3g} > {limit}: {case} rank {rank}/{world_size}"
                checked += 1
    assert checked >= world_size * (18 + 4) * 4


def test_hierarchical_over_a_subgroup():
    for rank, rank_results in enumerate(_results(6)[:4]):
        for case, errs in rank_results["subgroup"]:
            for name, err in errs.items():
                limit = 0.0 if name == "blind_row_max" else TOLERANCE[case.dtype]
                assert err <= limit, f"{name} error {err:.3g} > {limit}: {case} rank {rank}/4"


B, HQ, HKV, D = 2, 8, 2, 16


def _lens(world_size: int) -> tuple[list[int], list[int]]:
    return [3 + (r * 5) % 4 for r in range(world_size)], [7 + (r * 3) % 5 for r in range(world_size)]


def _bytes(rank: int, world_size: int, ranks_per_node: int, groups: HierarchicalGroups):
    q_lens, kv_lens = _lens(world_size)
    gen = torch.Generator().manual_seed(rank)
    q = torch.randn(B, q_lens[rank], HQ, D, generator=gen, dtype=torch.float64, requires_grad=True)
    k = torch.randn(B, kv_lens[rank], HKV, D, generator=gen, dtype=torch.float64, requires_grad=True)
    v = torch.randn(B, kv_lens[rank], HKV, D, generator=gen, dtype=torch.float64, requires_grad=True)
    with count_communication() as fwd:
        out = distributed_cross_attention(q, k, v, group=groups, strategy="hierarchical")
    with count_communication() as bwd:
        out.sum().backward()
    # Another strategy given the two-level groups runs over the parent (flat) group.
    flat = distributed_cross_attention(q.detach(), k.detach(), v.detach(), group=groups, strategy="query_ring")
    same = float((flat - out.detach()).abs().max())
    errors = {}
    for name, call in (
        ("not divisible", lambda: hierarchical_groups(world_size + 1)),
        ("not positive", lambda: hierarchical_groups(0)),
        ("flat group", lambda: distributed_cross_attention(q, k, v, group=dist.group.WORLD, strategy="hierarchical")),
        ("no group", lambda: distributed_cross_attention(q, k, v, strategy="hierarchical")),
    ):
        try:
            call()
        except ValueError as err:
            errors[name] = str(err)
    return dict(fwd=fwd.by_name, bwd=bwd.by_name, fwd_messages=fwd.messages, same=same, errors=errors)


def _expected_bytes(rank: int, world_size: int, ranks_per_node: int) -> tuple[dict, dict]:
    """Per name: the node's collectives (inner) and the query ring of node-sized blocks (outer), float64."""
    n_in, n_out, e = ranks_per_node, world_size // ranks_per_node, 8
    q_lens, _ = _lens(world_size)
    node = rank // n_in
    node_lens = [q_lens[a * n_in : (a + 1) * n_in] for a in range(n_out)]
    mine, longest, sq_node = q_lens[rank], max(node_lens[node]), sum(node_lens[node])
    row, stat = B * HQ * D * e, B * HQ * e  # one text row of Q (or O, dO, dQ) and of LSE (or D)
    lse_allreduce = 2 * (2 * (n_in - 1) * B * sq_node * HQ * e) // n_in
    # Query ring over the nodes: at step t the payload of node (node - t) % n_out goes on (n_out - 1
    # steps), the carry of every node's block once.
    sent = [sum(node_lens[(node - t) % n_out]) for t in range(n_out - 1)]
    every = sum(q_lens)
    fwd = {
        "inner.q": (n_in - 1) * mine * row,
        "inner.lse": lse_allreduce,
        "inner.o": (n_in - 1) * longest * row,
        "outer.payload": sum(sent) * row,
        "outer.carry": every * (row + stat),
    }
    bwd = {
        "inner.q": (n_in - 1) * mine * row,
        "inner.dout": (n_in - 1) * mine * row,
        "inner.lse": (n_in - 1) * mine * stat,
        "inner.delta": (n_in - 1) * mine * stat,
        "outer.payload": sum(sent) * (2 * row + 2 * stat),
        "outer.carry": every * row,
        "inner.dq": (n_in - 1) * longest * row,
    }
    return fwd, bwd


@pytest.mark.parametrize("world_size, ranks_per_node", [(4, 2), (6, 2), (6, 3)])
def test_bytes_split_between_inner_and_outer_groups(world_size, ranks_per_node):
    for rank, rank_results in enumerate(_results(world_size)):
        got = rank_results[ranks_per_node]["bytes"]
        want_fwd, want_bwd = _expected_bytes(rank, world_size, ranks_per_node)
        assert got["fwd"] == want_fwd, rank
        assert got["bwd"] == want_bwd, rank
        assert all(v > 0 for v in got["fwd"].values()) and got["fwd_messages"] > 0
        assert got["same"] < 1e-12
        errors = got["errors"]
        assert set(errors) == {"not divisible", "not positive", "flat group", "no group"}, errors
        assert f"ranks_per_node ({world_size + 1}) must divide" in errors["not divisible"]
        assert "ranks_per_node must be a positive int" in errors["not positive"]
        for name in ("flat group", "no group"):
            assert "strategy='hierarchical' needs group=HierarchicalGroups" in errors[name]


def test_wrong_usage_without_distributed():
    q, k = torch.randn(1, 3, 2, 4), torch.randn(1, 5, 2, 4)
    with pytest.raises(ValueError, match=r"strategy='hierarchical' needs group=HierarchicalGroups"):
        distributed_cross_attention(q, k, k, strategy="hierarchical")
    with pytest.raises(ValueError, match=r"or \['hierarchical'\], with group=HierarchicalGroups"):
        distributed_cross_attention(q, k, k, strategy="hierarchy")
    with pytest.raises(ValueError, match=r"needs torch\.distributed to be initialised"):
        hierarchical_groups(2)
    assert HierarchicalGroups.__dataclass_fields__.keys() >= {"inner", "outer", "ranks_per_node", "num_nodes"}


def _level_bytes(rank: int, world_size: int, ranks_per_node: int, groups: HierarchicalGroups) -> list:
    """Per case: bytes counted under ``inner.*`` / ``outer.*`` and in all, and the cost model's predictions."""
    rows = []
    for case in (
        Case("hierarchical", 8, 2, "images", torch.float32, seed=77, num_ids=3),
        Case("hierarchical", 4, 1, "padding", torch.float64, seed=78),
    ):
        _, fwd, bwd, shape = counted_bytes(case, rank, world_size, groups)
        counted = {
            level: tuple(sum(n for name, n in st.by_name.items() if name.startswith(f"{level}.")) for st in (fwd, bwd))
            for level in ("inner", "outer")
        }
        total = (fwd.bytes_sent, bwd.bytes_sent)
        predicted = predicted_level_bytes(shape, rank, ranks_per_node)
        rows.append((case, counted, predicted, total, predicted_bytes("hierarchical", shape, rank, ranks_per_node)))
    return rows


@pytest.mark.parametrize("world_size, ranks_per_node", [(4, 2), (6, 2), (6, 3)])
def test_cost_model_predicts_the_bytes_of_each_level(world_size, ranks_per_node):
    for rank, rank_results in enumerate(_results(world_size)):
        for case, counted, predicted, total, predicted_total in rank_results[ranks_per_node]["levels"]:
            assert counted == predicted, (case, rank)
            assert total == predicted_total, (case, rank)
        fwd, bwd = _expected_bytes(rank, world_size, ranks_per_node)
        shape = CallShape(tuple(_lens(world_size)[0]), tuple(_lens(world_size)[1]), B, HQ, HKV, D, 8, 8)
        assert predicted_bytes("hierarchical", shape, rank, ranks_per_node) == (sum(fwd.values()), sum(bwd.values()))
