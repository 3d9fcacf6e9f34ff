"""The Triton block-attention kernels against the float64 reference.

Without a GPU they run in Triton's CPU interpreter (conftest sets ``TRITON_INTERPRET=1``) on tiny
shapes in fp32 and fp16; the interpreter's bf16 ``tl.dot`` is not exact (it is not what the GPU
runs), so bf16 is checked on CUDA only, with larger shapes, head dims 64/80/128 and long keys.
"""

import dataclasses

import pytest
import torch

from lvx_megatron.launch import spawn_gloo
from lvx_megatron.ops import TorchReferenceBackend, TritonBackend, get_backend
from lvx_megatron.ops.backends import ShapeSelectingBackend, TorchFusedBackend
from lvx_megatron.ops.backends.triton_backend import pack_image_bits, triton_unavailable_reason
from lvx_megatron.ops.masks import BlockMask

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
pytestmark = pytest.mark.skipif(
    triton_unavailable_reason(DEVICE) is not None, reason=f"Triton cannot run here: {triton_unavailable_reason(DEVICE)}"
)
TOLERANCE = {torch.float32: 2e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}


@dataclasses.dataclass(frozen=True)
class Shape:
    b: int
    sq: int
    hq: int
    hkv: int
    skv: int
    d: int
    mask: str  # none | dense | ids | images


def _problem(shape: Shape, seed: int, sorted_ids: bool = True):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(shape.b, shape.sq, shape.hq, shape.d, generator=g, dtype=torch.float64)
    k = torch.randn(shape.b, shape.skv, shape.hkv, shape.d, generator=g, dtype=torch.float64)
    v = torch.randn(shape.b, shape.skv, shape.hkv, shape.d, generator=g, dtype=torch.float64)
    dout = torch.randn(shape.b, shape.sq, shape.hq, shape.d, generator=g, dtype=torch.float64)
    mask = None
    if shape.mask == "dense":
        mask = torch.rand(shape.b, shape.sq, shape.skv, generator=g) < 0.4
        mask[:, 0] = False  # a row that sees nothing
    elif shape.mask in ("ids", "images"):
        num_ids = 37  # two bitset words
        ids = torch.randint(-1, num_ids, (shape.b, shape.skv), generator=g)
        if sorted_ids:  # runs of one id, as images come: exercises the one-id tile path
            ids = ids.sort(dim=1).values
        q_mask = None
        if shape.mask == "images":
            q_mask = torch.rand(shape.b, shape.sq, num_ids, generator=g) < 0.5
            q_mask[:, 0] = False
        mask = BlockMask(q_mask, ids, shape.sq)
    return q, k, v, dout, mask


def _to(mask, device):
    if mask is None:
        return None
    if isinstance(mask, torch.Tensor):
        return mask.to(device)
    q_mask = None if mask.q_image_mask is None else mask.q_image_mask.to(device)
    return BlockMask(q_mask, mask.kv_image_ids.to(device), mask.num_queries)


def _rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    x = x.double().cpu()
    assert torch.isfinite(x).all(), "NaN or inf"
    return float((x - ref).norm() / ref.norm().clamp_min(1e-6))


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
    assert torch.allclose(lse.cpu().double()[finite], lse_ref[finite], atol=tol * 10, rtol=0)
    for name, got, want in zip(("dq", "dk", "dv"), grads, grads_ref, strict=True):
        assert got.shape == want.shape, name
        assert _rel(got, want) < tol, name
    blind = ~finite
    if blind.any():  # rows that see nothing: exactly zero output and dq
        assert (o.cpu()[blind] == 0).all() and (grads[0].cpu()[blind] == 0).all()


# Tiny shapes for the interpreter: odd lengths, GQA 1/3/4, several splits (> 256 keys) and one,
# partial tiles, every mask mode.
INTERPRETER_SHAPES = [
    Shape(1, 5, 4, 1, 300, 16, "none"),
    Shape(2, 7, 6, 2, 200, 16, "images"),
    Shape(1, 3, 3, 3, 530, 32, "images"),
    Shape(2, 4, 8, 2, 97, 16, "ids"),
    Shape(2, 5, 4, 2, 70, 16, "dense"),
    Shape(1, 9, 4, 1, 65, 80, "none"),
]


@pytest.mark.parametrize("shape", INTERPRETER_SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_kernels_match_float64_reference(shape, dtype):
    seed = INTERPRETER_SHAPES.index(shape)
    if CUDA:
        shape = dataclasses.replace(shape, sq=shape.sq * 9, skv=shape.skv * 31)
    _check(shape, dtype, seed)


@pytest.mark.parametrize("skip", [True, False])
def test_unsorted_ids_take_the_general_mask_path(skip):
    _check(Shape(2, 6, 4, 2, 150, 16, "images"), torch.float32, 3, TritonBackend(skip_empty_tiles=skip), False)


def test_rows_and_keys_that_see_nothing():
    q, k, v, _, _ = _problem(Shape(1, 4, 2, 1, 40, 16, "none"), 0)
    q, k, v = (t.to(DEVICE) for t in (q, k, v))
    ids = torch.full((1, 40), -1, device=DEVICE)  # all padding: every tile is skipped
    o, lse = TritonBackend().forward(q.float(), k.float(), v.float(), BlockMask(None, ids, 4), 0.25)
    assert (o == 0).all() and torch.isneginf(lse).all()
    empty = TritonBackend().forward(q.float(), k[:, :0].float(), v[:, :0].float(), None, 0.25)
    assert (empty[0] == 0).all() and torch.isneginf(empty[1]).all()


def test_image_bits_pack_every_id():
    mask = torch.zeros(1, 2, 70, dtype=torch.bool)
    mask[0, 0, [0, 31, 32, 69]] = True
    bits = pack_image_bits(mask)
    assert bits.shape == (1, 2, 3) and bits.dtype == torch.int32
    assert bits[0, 0].tolist() == [1 | -(2**31), 1, 1 << 5] and bits[0, 1].tolist() == [0, 0, 0]


def test_backend_names_resolve():
    assert isinstance(get_backend("triton", DEVICE, torch.float32), TritonBackend)
    if not CUDA:
        assert isinstance(get_backend("auto", DEVICE, torch.float32), TorchReferenceBackend)


@pytest.mark.skipif(not CUDA, reason="the auto selection chooses between CUDA kernels")
def test_shape_selection_prefers_triton_for_small_query_blocks_and_masks():
    sel = get_backend("auto", DEVICE, torch.bfloat16)
    assert isinstance(sel, ShapeSelectingBackend)
    q_small = torch.empty(1, 64, 32, 128, device=DEVICE, dtype=torch.bfloat16)
    q_tall = torch.empty(1, 4096, 32, 128, device=DEVICE, dtype=torch.bfloat16)
    mask = BlockMask(None, torch.zeros(1, 1024, dtype=torch.int64, device=DEVICE), 4096)
    assert isinstance(sel.choose(q_small, 8, None, backward=True), TritonBackend)
    assert isinstance(sel.choose(q_small, 32, None, backward=True), TorchFusedBackend)  # no GQA
    assert isinstance(sel.choose(q_small, 8, None, backward=False), TorchFusedBackend)
    for backward in (False, True):
        assert isinstance(sel.choose(q_tall, 8, None, backward), TorchFusedBackend)
        assert isinstance(sel.choose(q_tall, 8, mask, backward), TritonBackend)
        assert isinstance(sel.choose(q_small.float(), 8, None, backward), TorchFusedBackend)


@pytest.mark.skipif(not CUDA, reason="bf16 and realistic shapes need the GPU")
@pytest.mark.parametrize("d", [64, 80, 128, 256])
@pytest.mark.parametrize("mask", ["none", "images"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_cuda_kernels_long_keys(d, mask, dtype):
    _check(Shape(2, 67, 32, 8, 20011, d, mask), dtype, seed=d, backend=TritonBackend(skip_empty_tiles=d == 80))


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
