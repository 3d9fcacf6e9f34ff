"""The mask plan: tile classification and dense runs against the dense mask, the plan gathered over
ranks, and the per-call costs it removes."""

import pytest
import torch

from lvx_megatron.launch import spawn_gloo
from lvx_megatron.ops import MaskPlan, distributed_cross_attention
from lvx_megatron.ops import masks as ops_masks
from lvx_megatron.ops import prepare as ops_prepare
from lvx_megatron.ops.masks import TILE_EMPTY, TILE_FULL, TILE_PARTIAL, BlockMask, block_mask, classify_tiles


def _random_mask(gen: torch.Generator, trial: int):
    b, sq, skv = (int(torch.randint(lo, hi, (1,), generator=gen)) for lo, hi in ((1, 3), (1, 20), (1, 200)))
    n = int(torch.randint(1, 40, (1,), generator=gen))
    ids = torch.randint(-1, n, (b, skv), generator=gen)
    if trial % 2:  # images come as runs of one id
        ids = ids.sort(1).values
    q_mask = None if trial % 5 == 0 else torch.rand(b, sq, n, generator=gen) < (0.5, 0.95, 1.0)[trial % 3]
    return q_mask, ids, sq


def _expected_kind(dense: torch.Tensor, tokens: list[int], keys: slice) -> int:
    sub = dense[tokens][:, keys]
    return TILE_FULL if sub.all() else TILE_EMPTY if not sub.any() else TILE_PARTIAL


def test_tile_classification_and_lists_match_the_dense_mask():
    gen = torch.Generator().manual_seed(0)
    seen_kinds = set()
    for trial in range(60):
        q_mask, ids, sq = _random_mask(gen, trial)
        group, (block_m, block_n) = 1 + trial % 4, ((4, 8), (8, 16), (16, 32))[trial % 3]
        dense = block_mask(q_mask, ids, sq)
        kind = classify_tiles(q_mask, ids, sq, group, block_m, block_n)
        rows, skv = sq * group, ids.shape[1]
        r_tiles, c_tiles = -(-rows // block_m), -(-skv // block_n)
        assert kind.shape == (ids.shape[0], r_tiles, c_tiles)
        mask = BlockMask(q_mask, ids, sq)
        by_rows, by_keys = mask.tiles(group, block_m, block_n), mask.tiles(group, block_m, block_n, by_keys=True)
        for b in range(ids.shape[0]):
            for r in range(r_tiles):
                tokens = sorted({x // group for x in range(r * block_m, min((r + 1) * block_m, rows))})
                for c in range(c_tiles):
                    want = _expected_kind(dense[b], tokens, slice(c * block_n, (c + 1) * block_n))
                    assert kind[b, r, c] == want, (trial, b, r, c)
                    seen_kinds.add(want)
                # the kernels visit only listed tiles (ascending): full and partial ones, never an empty one
                full = [c for c in range(c_tiles) if kind[b, r, c] == TILE_FULL]
                assert by_rows.full_tiles(b, r) == full and by_rows.full_count[b, r] == len(full)
                partial = by_rows.partial_index[b, r, : by_rows.partial_count[b, r]].tolist()
                assert partial == [c for c in range(c_tiles) if kind[b, r, c] == TILE_PARTIAL]
                positions = by_rows.run_position[b, r, : by_rows.run_count[b, r]].tolist()
                lengths = by_rows.run_length[b, r, : by_rows.run_count[b, r]].tolist()
                assert positions == [sum(lengths[:j]) for j in range(len(lengths))]
            for c in range(c_tiles):
                full_rows = by_keys.full_tiles(b, c)
                part_rows = by_keys.partial_index[b, c, : by_keys.partial_count[b, c]].tolist()
                assert full_rows == [r for r in range(r_tiles) if kind[b, r, c] == TILE_FULL]
                assert part_rows == [r for r in range(r_tiles) if kind[b, r, c] == TILE_PARTIAL]
    assert seen_kinds == {TILE_EMPTY, TILE_PARTIAL, TILE_FULL}


def test_dense_runs_tile_the_mask_exactly():
    gen = torch.Generator().manual_seed(1)
    for trial in range(200):
        q_mask, ids, sq = _random_mask(gen, trial)
        dense = block_mask(q_mask, ids, sq)
        for b, runs in enumerate(BlockMask(q_mask, ids, sq).dense_runs()):
            cover = torch.zeros(sq, ids.shape[1], dtype=torch.int32)
            for r0, r1, keys in runs:
                assert 0 <= r0 < r1 <= sq and keys
                for c0, c1 in keys:
                    assert 0 <= c0 < c1 <= ids.shape[1]
                    cover[r0:r1, c0:c1] += 1
            assert cover.max() <= 1, "runs overlap"
            assert torch.equal(cover.bool(), dense[b]), trial


def test_video_masks_are_few_runs():
    """Frames seen by all text after a blind prefix: one run over the real tiles, blind rows in none."""
    ids = torch.tensor([[0] * 5 + [1] * 5 + [-1] * 3 + [2] * 4])
    q_mask = torch.ones(1, 6, 3, dtype=torch.bool)
    q_mask[:, :2] = False
    mask = BlockMask(q_mask, ids, 6)
    assert mask.dense_runs() == [[(2, 6, ((0, 10), (13, 17)))]]
    assert not mask.is_full()
    assert BlockMask(torch.ones(1, 4, 3, dtype=torch.bool), ids[:, :10], 4).is_full()
    interleaved = torch.ones(1, 6, 3, dtype=torch.bool)
    interleaved[:, :3, 1:] = False
    assert BlockMask(interleaved, ids, 6).dense_runs() == [[(0, 3, ((0, 5),)), (3, 6, ((0, 10), (13, 17)))]]


def _plan_worker(rank: int, world_size: int):
    gen = torch.Generator().manual_seed(3)
    q_lens, kv_lens = [2, 0, 3, 1, 4][:world_size], [5, 3, 0, 7, 2][:world_size]
    q_mask = torch.rand(2, sum(q_lens), 6, generator=gen) < 0.5
    ids = torch.randint(-1, 6, (2, sum(kv_lens)), generator=gen)
    q0, k0 = sum(q_lens[:rank]), sum(kv_lens[:rank])
    plan = MaskPlan.build(q_mask[:, q0 : q0 + q_lens[rank]], ids[:, k0 : k0 + kv_lens[rank]])
    out = {"layout": (plan.layout.q_lens, plan.layout.kv_lens)}
    for j in range(world_size):
        block = plan.block(slice(j, j + 1), slice(rank, rank + 1))
        qj = sum(q_lens[:j])
        want = block_mask(q_mask[:, qj : qj + q_lens[j]], ids[:, k0 : k0 + kv_lens[rank]], q_lens[j])
        out[j] = torch.equal(block.dense(), want)
        assert plan.block(slice(j, j + 1), slice(rank, rank + 1)) is block  # one object per pair
    everything = plan.block(slice(0, world_size), slice(0, world_size))
    out["all"] = torch.equal(everything.dense(), block_mask(q_mask, ids, sum(q_lens)))
    try:  # a rank with an id out of range: every rank raises, naming it
        bad = ids[:, k0 : k0 + kv_lens[rank]].clone()
        if rank == 0:
            bad[0, 0] = 6
        MaskPlan.build(q_mask[:, q0 : q0 + q_lens[rank]], bad)
        out["error"] = None
    except ValueError as err:
        out["error"] = str(err)
    return out


@pytest.mark.parametrize("world_size", [3, 5])
def test_plan_gathers_every_rank_once_and_checks_ids_everywhere(world_size):
    results = spawn_gloo(world_size, _plan_worker)
    q_lens, kv_lens = tuple([2, 0, 3, 1, 4][:world_size]), tuple([5, 3, 0, 7, 2][:world_size])
    for r in results:
        assert r["layout"] == (q_lens, kv_lens)
        assert all(r[j] for j in range(world_size)) and r["all"]
        assert r["error"] is not None and "on rank 0" in r["error"] and "[-1, 5]" in r["error"]


def test_a_planned_call_pays_its_fixed_costs_once(monkeypatch):
    """With a plan, the second layer's call exchanges no shapes and classifies no tiles again."""
    gen = torch.Generator().manual_seed(4)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # CPU: Triton's interpreter
    q = torch.randn(1, 6, 4, 8, generator=gen).to(device).requires_grad_()
    k = torch.randn(1, 30, 2, 8, generator=gen).to(device).requires_grad_()
    q_mask = (torch.rand(1, 6, 3, generator=gen) < 0.5).to(device)
    ids = torch.randint(-1, 3, (1, 30), generator=gen).to(device)
    calls = {"layout": 0, "classify": 0}

    def counting(name, fn):
        def wrapped(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)

        return wrapped

    monkeypatch.setattr(ops_prepare, "exchange_layout", counting("layout", ops_prepare.exchange_layout))
    monkeypatch.setattr(ops_masks, "classify_tiles", counting("classify", ops_masks.classify_tiles))
    plan = MaskPlan.build(q_mask, ids)
    outs = []
    for _layer in range(3):
        out = distributed_cross_attention(q, k, k, mask_plan=plan, backend="triton")
        out.backward(torch.ones_like(out))
        outs.append(out)
    assert calls["layout"] == 1
    # forward, dK/dV and dQ tiles: at most three classifications, made in the first layer only
    first_layer = calls["classify"]
    assert 1 <= first_layer <= 3
    ref = distributed_cross_attention(
        q.double(), k.double(), k.double(), q_image_mask=q_mask, kv_image_ids=ids, backend="torch"
    )
    assert torch.allclose(outs[-1].double(), ref, atol=1e-5)


def test_mask_plan_misuse_is_a_clear_error():
    q, k = torch.zeros(1, 4, 2, 8), torch.zeros(1, 10, 2, 8)
    plan = MaskPlan.build(torch.ones(1, 3, 2, dtype=torch.bool), torch.zeros(1, 10, dtype=torch.long))
    with pytest.raises(ValueError, match=r"mask_plan does not fit this call: it holds Sq_local 3"):
        distributed_cross_attention(q, k, k, mask_plan=plan)
    with pytest.raises(ValueError, match="either mask_plan or q_image_mask"):
        distributed_cross_attention(q, k, k, mask_plan=plan, kv_image_ids=torch.zeros(1, 10, dtype=torch.long))
    with pytest.raises(ValueError, match=r"num_queries \(this rank's text length\) is needed"):
        MaskPlan.build(None, torch.zeros(1, 10, dtype=torch.long))
