"""RMSNorm and LayerNorm that work with sequence parallelism without apex or Transformer Engine.

megatron-core's torch fallback (``WrappedTorchNorm``) refuses sequence parallelism; these mark
their parameters ``sequence_parallel`` so that megatron's ``finalize_model_grads`` sums their
gradients over the tensor-parallel group, exactly as for the fused norms.
"""

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel.mappings import copy_to_tensor_model_parallel_region
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.module import MegatronModule
from torch import Tensor
from torch.distributed import ProcessGroup


class _RMSNormFunction(torch.autograd.Function):
    """RMSNorm in fp32 (fp64 for fp64) that saves only its input and ``rstd`` for backward.

    Autograd through the plain formula would keep several fp32 copies of the input per norm
    (most of a layer's text-side activation memory).
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, eps: float) -> Tensor:
        acc = torch.promote_types(x.dtype, torch.float32)
        xa = x.to(acc)
        rstd = torch.rsqrt(xa.square().mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, weight, rstd)
        return (xa * rstd * weight.to(acc)).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, weight, rstd = ctx.saved_tensors
        acc = rstd.dtype
        x_hat = x.to(acc) * rstd
        g = grad.to(acc)
        gw = g * weight.to(acc)
        dx = rstd * (gw - x_hat * (gw * x_hat).mean(-1, keepdim=True))
        dweight = (g * x_hat).reshape(-1, x.shape[-1]).sum(0)
        return dx.to(x.dtype), dweight.to(weight.dtype), None


class _ScaleGradient(torch.autograd.Function):
    """Identity whose backward multiplies the gradient by ``scale``."""

    @staticmethod
    def forward(ctx, x: Tensor, scale: float) -> Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad * ctx.scale, None


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """``x * rsqrt(mean(x^2) + eps) * weight`` over the last dimension, accumulated in fp32 (fp64 for fp64)."""
    if x.is_cuda:
        # torch's fused kernels: same fp32 maths and saved tensors, but 3 kernels forward+backward
        # instead of ~23, which is most of the text decoder's launch overhead at short sequences.
        return F.rms_norm(x, x.shape[-1:], weight, eps)
    return _RMSNormFunction.apply(x, weight, eps)  # torch's CPU kernel keeps fp32 copies for backward


class RMSNorm(MegatronModule):
    """``x * rsqrt(mean(x^2) + eps) * weight`` over the last dimension, computed in fp32."""

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5) -> None:
        super().__init__(config=config)
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        self.weight.sequence_parallel = config.sequence_parallel

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x, self.weight, self.eps)

    def forward_replicated(self, x: Tensor, tp_group: ProcessGroup) -> Tensor:
        """Normalise ``x`` that every TP rank holds whole (e.g. the visual features) with this weight.

        Under sequence parallelism megatron sums this weight's gradient over TP, which is right for
        the text rows (each rank has its own) but would count a replicated input ``tp`` times; its
        share of the gradient is scaled by ``1 / tp`` (the value is unchanged).
        """
        weight = self.weight
        tp = tp_group.size()
        if self.weight.sequence_parallel and tp > 1:
            weight = _ScaleGradient.apply(weight, 1.0 / tp)
        return rms_norm(x, weight, self.eps)


class LayerNorm(MegatronModule):
    """``torch.nn.LayerNorm`` (weight and bias) computed in fp32 (fp64 for fp64), sequence-parallel aware."""

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5) -> None:
        super().__init__(config=config)
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        self.bias = torch.nn.Parameter(torch.zeros(hidden_size, dtype=config.params_dtype))
        for p in (self.weight, self.bias):
            p.sequence_parallel = config.sequence_parallel

    def forward(self, x: Tensor) -> Tensor:
        acc = torch.promote_types(x.dtype, torch.float32)
        out = F.layer_norm(x.to(acc), x.shape[-1:], self.weight.to(acc), self.bias.to(acc), self.eps)
        return out.to(x.dtype)


class HeadRMSNorm(RMSNorm):
    """Per-head RMSNorm on q or k whose heads are split over tensor parallelism.

    Every TP rank normalises different heads with the same weight, so the weight's gradient is
    summed over the TP group in this module's own backward (megatron's finalize step only does
    that for norms named ``q_layernorm``/``k_layernorm`` when ``config.qk_layernorm`` is set).
    """

    def __init__(
        self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, tp_group: ProcessGroup | None = None
    ) -> None:
        super().__init__(config, hidden_size, eps)
        self.weight.sequence_parallel = False
        self.tp_group = tp_group

    def forward(self, x: Tensor) -> Tensor:
        weight = self.weight
        if self.tp_group is not None and self.tp_group.size() > 1:
            weight = copy_to_tensor_model_parallel_region(weight, group=self.tp_group)
        return rms_norm(x, weight, self.eps)
