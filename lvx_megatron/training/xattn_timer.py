"""Share of a step's time spent in the cross-attention layers (forward and backward).

Forward hooks time each ``ContextParallelCrossAttention`` call; identity autograd nodes on its
output and input time its backward (autograd runs a module's backward between the gradient
reaching its output and leaving its input). Timing needs device synchronisation, so it is only
switched on for the steps that are logged.
"""

import time

import torch
from torch import Tensor

from ..core import ContextParallelCrossAttention


class _Mark(torch.autograd.Function):
    """Identity whose backward calls ``callback`` (a timestamp) as the gradient passes."""

    @staticmethod
    def forward(ctx, x: Tensor, callback):
        ctx.callback = callback
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        ctx.callback()
        return grad, None


class CrossAttentionTimer:
    """Accumulates seconds spent in every cross-attention module of ``model`` while active."""

    def __init__(self, model: torch.nn.Module, device: torch.device) -> None:
        self.device = device
        self.active = False
        self.seconds = 0.0
        self._handles = []
        for module in model.modules():
            if isinstance(module, ContextParallelCrossAttention):
                self._handles.append(module.register_forward_pre_hook(self._before, with_kwargs=True))
                self._handles.append(module.register_forward_hook(self._after))

    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def _before(self, module, args, kwargs):
        if not self.active:
            return None
        module._lvx_t0 = self._now()
        hidden, *rest = args
        if hidden.requires_grad:
            hidden = _Mark.apply(hidden, self._backward_end)
        return (hidden, *rest), kwargs

    def _after(self, module, args, output):
        if not self.active:
            return None
        self.seconds += self._now() - module._lvx_t0
        out, bias = output
        if out.requires_grad:
            out = _Mark.apply(out, self._backward_start)
        return out, bias

    def _backward_start(self) -> None:
        self._bwd_t0 = self._now()

    def _backward_end(self) -> None:
        self.seconds += self._now() - self._bwd_t0

    def start(self) -> None:
        self.active, self.seconds = True, 0.0

    def stop(self) -> float:
        """Stop timing; return the seconds accumulated since :meth:`start`."""
        self.active = False
        return self.seconds
