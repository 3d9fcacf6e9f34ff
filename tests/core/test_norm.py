"""The memory-lean RMSNorm: same values and gradients as the plain formula, float64 gradcheck.

On CUDA the norm is torch's fused kernel, on CPU our own autograd Function; both are checked.
"""

import pytest
import torch

from lvx_megatron.core.norm import rms_norm

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))]


def _plain(x, w, eps):
    return x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps) * w


@pytest.mark.parametrize("device", DEVICES)
def test_rms_norm_matches_plain_formula_and_passes_gradcheck(device):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, 3, 16, generator=gen, dtype=torch.float64).to(device).requires_grad_()
    w = (1 + 0.1 * torch.randn(16, generator=gen, dtype=torch.float64)).to(device).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: rms_norm(a, b, 1e-6), (x, w))
    g = torch.randn(5, 3, 16, generator=gen, dtype=torch.float64).to(device)
    ours = torch.autograd.grad(rms_norm(x, w, 1e-6), (x, w), g)
    ref = torch.autograd.grad(_plain(x, w, 1e-6), (x, w), g)
    for a, b in zip(ours, ref, strict=True):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
def test_rms_norm_bf16_accumulates_in_fp32(device):
    gen = torch.Generator().manual_seed(1)
    x = (3 * torch.randn(8, 2, 512, generator=gen)).to(device, torch.bfloat16).requires_grad_()
    w = (1 + 0.1 * torch.randn(512, generator=gen)).to(device, torch.bfloat16).requires_grad_()
    g = torch.randn(8, 2, 512, generator=gen).to(device, torch.bfloat16)
    y = rms_norm(x, w, 1e-5)
    y.backward(g)
    xd, wd = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    ref = _plain(xd, wd, 1e-5)
    ref.backward(g.double())
    assert y.dtype == torch.bfloat16 and not y.isnan().any()
    # one bf16 rounding of values of size ~3 (an ulp is 2^-6); the weight gradient sums 16 rows
    assert (y.double() - ref).abs().max() <= 2**-6
    assert (x.grad.double() - xd.grad).abs().max() <= 2**-6
    assert ((w.grad.double() - wd.grad).abs() / wd.grad.abs().clamp(min=1)).max() <= 2**-7


@pytest.mark.parametrize("device", DEVICES)
def test_rms_norm_saves_no_fp32_copy_of_a_low_precision_input(device):
    x = torch.randn(64, 32, dtype=torch.bfloat16, device=device, requires_grad=True)
    w = torch.ones(32, dtype=torch.bfloat16, device=device, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        rms_norm(x, w, 1e-5)
    assert saved and all(t.dtype == torch.bfloat16 or t.shape[-1] == 1 for t in saved)
