"""The Triton block-attention kernels against the float64 reference.

Without a GPU they run in Triton's CPU interpreter (conftest sets ``TRITON_INTERPRET=1``) on tiny
shapes in fp32 and fp16; the interpreter's bf16 ``tl.dot`` is not exact (it is not what the GPU
runs), so bf16 is checked on CUDA only, with larger shapes, head dims 64/80/128 and long keys.
Masked calls walk the tile lists of their mask; the shapes and masks are chosen so that every
kernel meets full, partial and empty tiles (checked, not assumed).
"""

import dataclasses

import pytest
import torch

from lvx_megatron.launch import spawn_gloo
from lvx_megatron.ops import TorchReferenceBackend, TritonBackend, get_backend
from lvx_megatron.ops.backends import ShapeSelectingBackend, TorchFusedBackend
from lvx_megatron.ops.backends.triton_backend import (
    dkdv_config,
    dq_config,
    forward_config,
    seeing_rows,
    single_range_runs,
)
from lvx_megatron.ops.masks import TILE_EMPTY, TILE_FULL, TILE_PARTIAL, BlockMask, classify_tiles

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
TOLERANCE = {torch.float32: 2e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}
# Absolute LSE errors: rounding q and k to fp16 / bf16 moves scores of order one by about 2^-11 /
# 2^-8 relative per factor, and the LSE by a weighted mean of those moves.
LSE_TOLERANCE = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}


@dataclasses.dataclass(frozen=True)
class Shape:
    b: int
    sq: int
    hq: int
    hkv: int
    skv: int
    d: int
    mask: str  # none | ids | images | video | interleaved | blind | segments | ragged


def _video_mask(shape: Shape, g: torch.Generator, interleaved: bool, padded: bool = True) -> BlockMask:
    """What the models make: frames as runs of ids with tile padding (-1) between them, text that
    sees every frame after a blind prefix, or (interleaved) half the text seeing half the frames."""
    frames = 5
    per_frame = -(-shape.skv // frames)
    ids = torch.arange(frames).repeat_interleave(per_frame)[: shape.skv].clone()
    if padded:
        ids[per_frame - per_frame // 4 : per_frame] = -1  # a padded tail in the first frame
        ids[2 * per_frame : 3 * per_frame] = -1  # a padded tile
    ids = ids.expand(shape.b, -1).clone()
    q_mask = torch.ones(shape.b, shape.sq, frames, dtype=torch.bool)
    q_mask[:, :2] = False  # text before the first frame
    if interleaved:
        q_mask[:, 2 : shape.sq // 2, frames // 2 :] = False
    return BlockMask(q_mask, ids, shape.sq)


def _segments_mask(shape: Shape) -> BlockMask:
    """The multi-image layout on tile boundaries: 4 images of ``skv / 4`` keys (the third padding),
    text segment ``i`` of 2 sees images ``<= 2 i + 1``; every tile of every kernel is full or empty."""
    ids = torch.arange(4).repeat_interleave(shape.skv // 4)
    ids[ids == 2] = -1
    q_mask = torch.ones(shape.b, shape.sq, 4, dtype=torch.bool)
    q_mask[:, : shape.sq // 2, 2:] = False
    return BlockMask(q_mask, ids.expand(shape.b, -1).clone(), shape.sq)


def _ragged_mask(shape: Shape) -> BlockMask:
    """The multi-image layout off tile boundaries, other in each sample: 3 images of uneven size,
    text segment ``i`` sees the images up to ``i``; the tiles at segment ends are partial."""
    ids, q_mask = [], []
    for b in range(shape.b):
        edges = torch.tensor([0, shape.skv // 3 + 7 * b + 5, 2 * shape.skv // 3 - 3, shape.skv])
        ids.append(torch.bucketize(torch.arange(shape.skv), edges[1:], right=True))
        segment = torch.bucketize(
            torch.arange(shape.sq), torch.tensor([shape.sq // 3 + b, 2 * shape.sq // 3 + 1]), right=True
        )
        q_mask.append(torch.arange(3)[None, :] <= segment[:, None])
    return BlockMask(torch.stack(q_mask), torch.stack(ids), shape.sq)


def _problem(shape: Shape, seed: int, sorted_ids: bool = True):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(shape.b, shape.sq, shape.hq, shape.d, generator=g, dtype=torch.float64)
    k = torch.randn(shape.b, shape.skv, shape.hkv, shape.d, generator=g, dtype=torch.float64)
    v = torch.randn(shape.b, shape.skv, shape.hkv, shape.d, generator=g, dtype=torch.float64)
    dout = torch.randn(shape.b, shape.sq, shape.hq, shape.d, generator=g, dtype=torch.float64)
    mask = None
    if shape.mask in ("ids", "images"):
        num_ids = 37  # two bitset words
        ids = torch.randint(-1, num_ids, (shape.b, shape.skv), generator=g)
        if sorted_ids:  # runs of one id, as images come: exercises the one-id tile path
            ids = ids.sort(dim=1).values
        q_mask = None
        if shape.mask == "images":
            q_mask = torch.rand(shape.b, shape.sq, num_ids, generator=g) < 0.5
            q_mask[:, 0] = False
        mask = BlockMask(q_mask, ids, shape.sq)
    elif shape.mask in ("video", "interleaved", "blind"):
        mask = _video_mask(shape, g, shape.mask == "interleaved", padded=shape.mask != "blind")
    elif shape.mask == "segments":
        mask = _segments_mask(shape)
    elif shape.mask == "ragged":
        mask = _ragged_mask(shape)
    return q, k, v, dout, mask


def _to(mask: BlockMask | None, device) -> BlockMask | None:
    if mask is None:
        return None
    q_mask = None if mask.q_image_mask is None else mask.q_image_mask.to(device)
    return BlockMask(q_mask, mask.kv_image_ids.to(device), mask.num_queries)


def _rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    x = x.double().cpu()
    assert torch.isfinite(x).all(), "NaN or inf"
    return float((x - ref).norm() / ref.norm())


def _tile_kinds(mask: BlockMask, shape: Shape, dtype: torch.dtype) -> set[int]:
    """The tile kinds each kernel of this call meets (all three kernels' tiles)."""
    g = shape.hq // shape.hkv
    configs = [forward_config(g * shape.sq, shape.d, dtype), dkdv_config(shape.d, dtype), dq_config(shape.d, dtype)]
    kinds = set()
    for c in configs:
        kind = classify_tiles(mask.q_image_mask, mask.kv_image_ids, shape.sq, g, c.block_m, c.block_n)
        kinds |= set(kind.unique().tolist())
    return kinds


def _check(shape: Shape, dtype: torch.dtype, seed: int, backend=None, sorted_ids: bool = True) -> None:
    q, k, v, dout, mask = _problem(shape, seed, sorted_ids)
    scale = shape.d**-0.5
    ref = TorchReferenceBackend()
    o_ref, lse_ref = ref.forward(q, k, v, mask, scale)
    delta = (dout * o_ref).sum(-1)
    grads_ref = ref.backward(dout, q, k, v, lse_ref, delta, mask, scale)

    backend = backend or TritonBackend()
    cast = lambda t: t.to(DEVICE, dtype)
    dev_mask = _to(mask, DEVICE)
    o, lse = backend.forward(cast(q), cast(k), cast(v), dev_mask, scale)
    grads = backend.backward(
        cast(dout), cast(q), cast(k), cast(v), lse_ref.float().to(DEVICE), delta.float().to(DEVICE), dev_mask, scale
    )
    tol = TOLERANCE[dtype]
    assert o.dtype == dtype and o.shape == q.shape
    assert _rel(o, o_ref) < tol
    assert torch.equal(torch.isneginf(lse.cpu()), torch.isneginf(lse_ref)), "rows that see nothing must get -inf"
    finite = torch.isfinite(lse_ref)
    assert torch.allclose(lse.cpu().double()[finite], lse_ref[finite], atol=LSE_TOLERANCE[dtype], rtol=0)
    for name, got, want in zip(("dq", "dk", "dv"), grads, grads_ref, strict=True):
        assert got.shape == want.shape, name
        assert _rel(got, want) < tol, name
    blind = ~finite
    if blind.any():  # rows that see nothing: exactly zero output and dq
        assert (o.cpu()[blind] == 0).all() and (grads[0].cpu()[blind] == 0).all()


# Tiny shapes for the interpreter: odd lengths, GQA 1/3/4, several splits (> 256 keys) and one,
# partial tiles, every mask kind.
INTERPRETER_SHAPES = [
    Shape(1, 5, 4, 1, 300, 16, "none"),
    Shape(2, 7, 6, 2, 200, 16, "images"),
    Shape(1, 3, 3, 3, 530, 32, "images"),
    Shape(2, 4, 8, 2, 97, 16, "ids"),
    Shape(1, 40, 4, 2, 700, 16, "video"),
    Shape(1, 150, 2, 2, 700, 16, "interleaved"),
    Shape(2, 30, 4, 2, 400, 16, "blind"),  # only a blind prefix: the unmasked kernels on the other rows
    Shape(1, 128, 4, 2, 512, 16, "segments"),  # tile lists without partial tiles (HAS_PARTIAL off)
    Shape(2, 70, 4, 2, 400, 16, "ragged"),  # a forward by dense runs, a backward by tile lists
    Shape(1, 9, 4, 1, 65, 80, "none"),
]


@pytest.mark.parametrize("shape", INTERPRETER_SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_kernels_match_float64_reference(shape, dtype):
    seed = INTERPRETER_SHAPES.index(shape)
    if CUDA:
        shape = dataclasses.replace(shape, sq=shape.sq * 9, skv=shape.skv * 31)
    _check(shape, dtype, seed)


@pytest.mark.parametrize("shape", [s for s in INTERPRETER_SHAPES if s.mask in ("video", "interleaved")])
def test_masked_shapes_meet_every_tile_kind(shape):
    _, _, _, _, mask = _problem(shape, 0)
    assert _tile_kinds(mask, shape, torch.float32) == {TILE_EMPTY, TILE_PARTIAL, TILE_FULL}


def test_a_mask_on_tile_boundaries_has_no_partial_tiles_in_any_kernel():
    shape = next(s for s in INTERPRETER_SHAPES if s.mask == "segments")
    _, _, _, _, mask = _problem(shape, 0)
    assert seeing_rows(mask) is None  # the masked kernels, not the unmasked ones on a row range
    for dtype in (torch.float32, torch.float16):
        assert _tile_kinds(mask, shape, dtype) == {TILE_EMPTY, TILE_FULL}
    g = shape.hq // shape.hkv
    assert not mask.has_partial_tiles(g, 64, 32) and not mask.has_partial_tiles(g, 32, 32)
    images = next(s for s in INTERPRETER_SHAPES if s.mask == "images")
    _, _, _, _, random_mask = _problem(images, 1)
    assert random_mask.has_partial_tiles(images.hq // images.hkv, 64, 32)


def test_a_forward_with_partial_tiles_and_single_range_runs_goes_by_runs():
    shape = next(s for s in INTERPRETER_SHAPES if s.mask == "ragged")
    _, _, _, _, mask = _problem(shape, 0)
    g = shape.hq // shape.hkv
    tiles = forward_config(g * shape.sq, shape.d, torch.float32)
    assert mask.has_partial_tiles(g, tiles.block_m, tiles.block_n)
    runs = single_range_runs(mask)
    assert runs is not None and runs[0] != runs[1]  # the samples' runs differ
    assert [len(sample) for sample in runs] == [3, 3] and runs[0][0][2:] == (0, shape.skv // 3 + 5)
    video = next(s for s in INTERPRETER_SHAPES if s.mask == "video")
    assert single_range_runs(_problem(video, 0)[4]) is None  # padding between frames: several ranges


def test_a_blind_prefix_alone_runs_the_unmasked_kernels_on_the_other_rows():
    _, _, _, _, mask = _problem(next(s for s in INTERPRETER_SHAPES if s.mask == "blind"), 0)
    assert seeing_rows(mask) == (2, 30)
    _, _, _, _, video = _problem(next(s for s in INTERPRETER_SHAPES if s.mask == "video"), 0)
    assert seeing_rows(video) is None  # padding between frames: the tile lists


def test_unsorted_ids_take_the_general_mask_path():
    _check(Shape(2, 6, 4, 2, 150, 16, "images"), torch.float32, 3, sorted_ids=False)


def test_rows_and_keys_that_see_nothing():
    q, k, v, _, _ = _problem(Shape(1, 4, 2, 1, 40, 16, "none"), 0)
    q, k, v = (t.to(DEVICE) for t in (q, k, v))
    ids = torch.full((1, 40), -1, device=DEVICE)  # all padding: every tile is empty
    o, lse = TritonBackend().forward(q.float(), k.float(), v.float(), BlockMask(None, ids, 4), 0.25)
    assert (o == 0).all() and torch.isneginf(lse).all()
    empty = TritonBackend().forward(q.float(), k[:, :0].float(), v[:, :0].float(), None, 0.25)
    assert (empty[0] == 0).all() and torch.isneginf(empty[1]).all()


@pytest.mark.parametrize("kind", ["nan", "inf"])
def test_hidden_non_finite_keys_reach_only_the_rows_that_see_them(kind):
    """NaN/Inf in the K/V of padding and in a value of a frame that half the text does not see: the
    rows that do not see a poisoned value stay exact, the rows that see one do not look finite, and padding
    keys get zero gradients."""
    shape = Shape(1, 150, 2, 2, 700, 16, "interleaved")
    q, k, v, dout, mask = _problem(shape, 5)
    dense = mask.dense()[0]  # [Sq, Skv]
    padded = mask.kv_image_ids[0] < 0
    partly_seen = int((dense.any(0) & ~dense.all(0)).nonzero()[0])  # a key seen by some rows only
    k_bad, v_bad = k.clone(), v.clone()
    k_bad[0, padded] = float(kind)
    v_bad[0, padded] = float(kind)
    v_bad[0, partly_seen] = float(kind)
    viewers = dense[:, partly_seen]
    assert viewers.any() and not viewers.all()
    scale = shape.d**-0.5
    clean_o, clean_lse = TorchReferenceBackend().forward(q, k, v, mask, scale)
    delta = (dout * clean_o).sum(-1)
    dev = lambda t: t.to(DEVICE, torch.float32)
    for backend in (TorchReferenceBackend(), TritonBackend()):
        dmask = _to(mask, DEVICE)
        o, _ = backend.forward(dev(q), dev(k_bad), dev(v_bad), dmask, scale)
        o = o.double().cpu()[0]
        assert (~torch.isfinite(o[viewers])).flatten(1).all(1).all(), backend.name
        assert torch.allclose(o[~viewers], clean_o[0, ~viewers], atol=1e-5, rtol=0), backend.name
        grads = backend.backward(dev(dout), dev(q), dev(k_bad), dev(v_bad), dev(clean_lse), dev(delta), dmask, scale)
        dq, dk, dv = (g.double().cpu()[0] for g in grads)
        assert torch.isfinite(dq[~viewers]).all(), backend.name
        assert (~torch.isfinite(dq[viewers])).flatten(1).any(1).all(), backend.name
        assert (dk[padded] == 0).all() and (dv[padded] == 0).all(), backend.name


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_large_scores_do_not_overflow(dtype):
    """Inputs near fp16's largest values: scores of ~1e9 are handled by the max-subtracted softmax."""
    shape = Shape(1, 6, 4, 2, 120, 16, "images")
    q, k, v, _, mask = _problem(shape, 11)
    q, k = q * 150.0, k * 150.0  # |q.k| up to ~1e6 after scaling, far past exp's range
    ref_o, ref_lse = TorchReferenceBackend().forward(q, k, v, mask, 1.0)
    cast = lambda t: t.to(DEVICE, dtype)
    o, lse = TritonBackend().forward(cast(q), cast(k), cast(v), _to(mask, DEVICE), 1.0)
    finite = torch.isfinite(ref_lse)
    assert torch.isfinite(o).all() and torch.isfinite(lse.cpu()[finite]).all()
    # with such scores the softmax is one-hot: the output is the value of the best key
    assert _rel(o, ref_o) < 1e-2


def test_backend_names_resolve():
    assert isinstance(get_backend("triton", DEVICE, torch.float32), TritonBackend)
    if not CUDA:
        assert isinstance(get_backend("auto", DEVICE, torch.float32), TorchReferenceBackend)


def test_shape_selection():
    """Short blocks on Triton (unmasked ones with GQA); tall masked blocks as dense runs on the fused
    kernels when they are few and tall, else on Triton; fp32 on the fused kernels."""
    sel = ShapeSelectingBackend()
    q_small = torch.empty(1, 128, 32, 128, device=DEVICE, dtype=torch.bfloat16)
    q_tall = torch.empty(1, 4096, 32, 128, device=DEVICE, dtype=torch.bfloat16)
    ids = torch.zeros(1, 1024, dtype=torch.int64, device=DEVICE)
    whole = BlockMask(None, ids, 4096)
    half = torch.ones(1, 4096, 2, dtype=torch.bool, device=DEVICE)
    half[:, :2048, 1] = False  # two runs of 2048 tokens: 8192 packed rows each
    two_runs = BlockMask(half, torch.cat([ids[:, :512], ids[:, 512:] + 1], 1), 4096)
    blind = torch.ones(1, 4096, 1, dtype=torch.bool, device=DEVICE)
    blind[:, 2:] = False
    short_run = BlockMask(blind, ids, 4096)  # only 2 tokens see anything: 8 packed rows
    fragmented = BlockMask(None, (torch.arange(1024, device=DEVICE) % 2 - 1).view(1, -1), 4096)
    for backward in (False, True):
        assert sel.choose(q_small, 8, None, backward) is sel.triton
        assert sel.choose(q_small, 32, None, backward) is sel.fused  # no GQA
        assert sel.choose(q_small, 8, whole, backward) is sel.triton
        assert sel.choose(q_tall, 8, None, backward) is sel.fused
        assert sel.choose(q_tall, 8, whole, backward) is sel.fused
        assert sel.choose(q_tall, 8, two_runs, backward) is sel.fused
        assert sel.choose(q_tall, 8, short_run, backward) is sel.triton
        assert sel.choose(q_tall, 8, fragmented, backward) is sel.fused  # one run, 512 key ranges gathered
        assert sel.choose(q_small.float(), 8, None, backward) is sel.fused


@pytest.mark.skipif(not CUDA, reason="the fused kernels need CUDA")
@pytest.mark.parametrize("mask", ["video", "interleaved", "images"])
def test_fused_dense_runs_match_float64_reference(mask):
    _check(Shape(2, 300, 32, 8, 9000, 128, mask), torch.bfloat16, seed=3, backend=TorchFusedBackend())


CUDA_LONG_KEYS = [(d, mask, torch.bfloat16) for d in (64, 128, 256) for mask in ("none", "images", "video")]
CUDA_LONG_KEYS += [(80, "images", torch.float16), (128, "interleaved", torch.float16)]


@pytest.mark.skipif(not CUDA, reason="bf16 and realistic shapes need the GPU")
@pytest.mark.parametrize("d, mask, dtype", CUDA_LONG_KEYS, ids=str)
def test_cuda_kernels_long_keys(d, mask, dtype):
    _check(Shape(2, 67, 32, 8, 20011, d, mask), dtype, seed=d)


def _ring_worker(rank: int, world_size: int):
    from cases import Case, run_case

    return [
        run_case(Case(strategy, 4, 2, masks, torch.float32, seed=7 + i, backend="triton"), rank, world_size)
        for i, (strategy, masks) in enumerate([("query_ring", "images"), ("kv_ring", "padding")])
    ]


@pytest.mark.skipif(CUDA, reason="CPU ranks over gloo")
def test_strategies_on_the_triton_backend_over_three_ranks():
    for per_rank in spawn_gloo(3, _ring_worker):
        for errs in per_rank:
            assert max(v for key, v in errs.items() if key != "blind_row_max") < 1e-5, errs
            assert errs.get("blind_row_max", 0.0) == 0.0
