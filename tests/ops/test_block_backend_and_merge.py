"""The pure-torch block backend and the LSE merge against the dense float64 reference."""

import pytest
import torch

from lvx_megatron.ops import TorchReferenceBackend, dense_cross_attention
from lvx_megatron.ops.masks import BlockMask, block_mask
from lvx_megatron.ops.merge import merge_partials


def _inputs(seed, b=2, sq=5, hq=8, hkv=2, skv=11, d=16, n_ids=3):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, sq, hq, d, generator=g, dtype=torch.float64)
    k = torch.randn(b, skv, hkv, d, generator=g, dtype=torch.float64)
    v = torch.randn(b, skv, hkv, d, generator=g, dtype=torch.float64)
    ids = torch.randint(-1, n_ids, (b, skv), generator=g)
    q_mask = torch.rand(b, sq, n_ids, generator=g) < 0.6
    q_mask[:, 1] = False
    return q, k, v, ids, q_mask


@pytest.mark.parametrize("hkv", [8, 2, 1])
@pytest.mark.parametrize("masked", [False, True])
def test_reference_backend_forward_and_backward(hkv, masked):
    q, k, v, ids, q_mask = _inputs(hkv, hkv=hkv)
    if not masked:
        ids = q_mask = None
    scale = 0.3
    backend = TorchReferenceBackend()
    mask = None if ids is None else BlockMask(q_mask, ids, q.shape[1])
    o, lse = backend.forward(q, k, v, mask, scale)

    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = dense_cross_attention(*leaves, scale, q_mask, ids)
    assert torch.allclose(o, ref, rtol=0, atol=1e-12)

    dout = torch.randn_like(ref)
    ref_grads = torch.autograd.grad(ref, leaves, dout)
    delta = (dout * o).sum(-1)
    grads = backend.backward(dout, q, k, v, lse, delta, mask, scale)
    for got, want in zip(grads, ref_grads, strict=True):
        assert torch.isfinite(got).all()
        assert torch.allclose(got, want, rtol=0, atol=1e-12)
    if masked:
        assert torch.isneginf(lse[:, 1]).all() and (o[:, 1] == 0).all() and (grads[0][:, 1] == 0).all()


def test_split_and_merge_equals_full_attention():
    q, k, v, ids, q_mask = _inputs(7, skv=20)
    backend = TorchReferenceBackend()
    full, full_lse = backend.forward(q, k, v, BlockMask(q_mask, ids, q.shape[1]), 0.25)
    o, lse = None, None
    for part in (slice(0, 0), slice(0, 3), slice(3, 12), slice(12, 20)):
        po, plse = backend.forward(q, k[:, part], v[:, part], BlockMask(q_mask, ids[:, part], q.shape[1]), 0.25)
        o, lse = (po, plse) if o is None else merge_partials(o, lse, po, plse)
    assert torch.equal(torch.isneginf(lse), torch.isneginf(full_lse))
    assert torch.allclose(o, full, rtol=0, atol=1e-12)
    finite = torch.isfinite(full_lse)
    assert torch.allclose(lse[finite], full_lse[finite], rtol=0, atol=1e-12)


def test_merge_does_not_overflow_for_large_scores():
    o_a, o_b = torch.ones(1, 1, 1, 2), 2 * torch.ones(1, 1, 1, 2)
    lse_a, lse_b = torch.full((1, 1, 1), 1000.0), torch.full((1, 1, 1), 1000.0)
    o, lse = merge_partials(o_a, lse_a, o_b, lse_b)
    # exp(1000) overflows fp32; the merge only ever exponentiates differences.
    assert torch.allclose(o, torch.full_like(o, 1.5), rtol=1e-3)
    assert torch.allclose(lse, torch.full_like(lse, 1000.0 + torch.log(torch.tensor(2.0)).item()))


def test_block_mask_semantics():
    ids = torch.tensor([[0, 0, 1, -1, 2]])
    q_mask = torch.tensor([[[True, False, False], [False, True, True], [False, False, False]]])
    mask = block_mask(q_mask, ids, 3)
    assert mask.tolist() == [[[True, True, False, False, False], [False, False, True, False, True], [False] * 5]]
    assert block_mask(None, ids, 2).tolist() == [[[True, True, True, False, True]] * 2]
