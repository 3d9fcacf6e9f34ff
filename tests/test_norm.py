"""The memory-lean RMSNorm: same values and gradients as the plain formula, float64 gradcheck."""

import torch

from lvx_megatron.core.norm import _rms_norm


def _plain(x, w, eps):
    return x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps) * w


def test_rms_norm_matches_plain_formula_and_passes_gradcheck():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, 3, 16, generator=gen, dtype=torch.float64, requires_grad=True)
    w = (1 + 0.1 * torch.randn(16, generator=gen, dtype=torch.float64)).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: _rms_norm(a, b, 1e-6), (x, w))
    g = torch.randn(5, 3, 16, generator=gen, dtype=torch.float64)
    ours = torch.autograd.grad(_rms_norm(x, w, 1e-6), (x, w), g)
    ref = torch.autograd.grad(_plain(x, w, 1e-6), (x, w), g)
    for a, b in zip(ours, ref, strict=True):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)


def test_rms_norm_saves_no_fp32_copy_of_a_low_precision_input():
    x = torch.randn(64, 32, dtype=torch.bfloat16, requires_grad=True)
    w = torch.ones(32, dtype=torch.bfloat16, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        _rms_norm(x, w, 1e-5)
    assert all(t.dtype == torch.bfloat16 or t.shape[-1] == 1 for t in saved)
