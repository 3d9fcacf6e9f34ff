"""The block-attention benchmark's masks, its FlexAttention mask tables and its summary, on CPU
(the timings themselves need a GPU: tools/bench_block_attention.py)."""

import pytest
import torch

from tools import bench_block_attention as bench

SQ, SKV = 48, 768


@pytest.mark.parametrize("kind", bench.MASKS[1:])
def test_flex_tables_give_the_block_mask(kind):
    mask = bench.make_mask(kind, SQ, SKV, torch.device("cpu"))
    visible, ids = bench.flex_mask_tables(mask)
    assert ids.min() >= 0 and ids.max() < visible.shape[1]  # no -1 left to index with
    assert not visible[:, -1].any()  # the padding column
    assert torch.equal(visible[:, ids.long()], mask.dense()[0])


@pytest.mark.parametrize("kind, share", [("all", 1.0), ("segments", 2 / 3), ("sparse", 3 / 8), ("interleaved", 0.75)])
def test_the_masks_show_the_documented_share_of_the_work(kind, share):
    mask = bench.make_mask(kind, SQ, SKV, torch.device("cpu"))
    assert bench.visible_pairs(mask, SQ, SKV) / (SQ * SKV) == pytest.approx(share, abs=1e-9)
    assert bench.visible_pairs(mask, SQ, SKV) == int(mask.dense().sum())


def _row(variant: str, mask: str, ms: float) -> dict:
    flops = 1e9
    return dict(hq=32, hkv=8, sq=64, skv=1024, mask=mask, variant=variant, fwd_bwd_ms=ms, fwd_bwd_tflops=flops / ms)


def test_the_summary_compares_auto_with_the_fastest_peer_on_each_mask():
    rows = [
        _row("auto", "none", 1.0),
        _row("sdpa/cudnn", "none", 2.0),
        _row("sdpa/cudnn-expanded", "none", 0.8),
        _row("auto", "all", 1.0),
        _row("flex", "all", 4.0),
        _row("flex/fa4", "all", 2.0),
        _row("auto", "segments", 0.7),
        {**_row("flex/fa4", "segments", 1.0), "error": "unsupported"},
        _row("flex", "segments", 1.4),
    ]
    (entry,) = bench.summarize(rows)
    none, all_, segments = (entry["masks"][m] for m in ("none", "all", "segments"))
    assert none["best_peer"] == "sdpa/cudnn-expanded" and none["over_best_peer"] == pytest.approx(0.8)
    assert all_["best_peer"] == "flex/fa4" and all_["over_best_peer"] == pytest.approx(2.0)
    assert segments["best_peer"] == "flex" and segments["over_best_peer"] == pytest.approx(2.0)
    assert entry["segments_over_all_time"] == pytest.approx(0.7)
