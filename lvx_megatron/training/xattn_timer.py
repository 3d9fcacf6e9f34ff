"""Step time without the observer's cost, and the share of it spent in cross-attention.

:class:`StepTimer` times the steps of a logging interval as a whole: the device is synchronised
only where a timed stretch of steps ends (a log record, or other work such as evaluation or a
checkpoint coming up) and around the sampled steps below, never inside an ordinary step.

:class:`CrossAttentionTimer` measures cross-attention's share on a few sampled steps: forward
hooks time each cross-attention call; identity autograd nodes on its output and input time its
backward (autograd runs a module's backward between the gradient reaching its output and leaving
its input). Each of those timestamps synchronises the device, so sampled steps are slower; they
are left out of the step time.
"""

import time
from collections.abc import Callable

import torch
from torch import Tensor

from ..core import ContextParallelCrossAttention


def device_sync(device: torch.device) -> Callable[[], None]:
    """A function that waits for the work queued on ``device`` (a no-op on CPU)."""
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


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
    """Accumulates seconds spent in every cross-attention module of ``model`` while active.

    ``sync`` waits for the device (:func:`device_sync`). ``module_types``: the modules timed
    (megatron-style: ``forward(hidden, ...)`` returning ``(output, bias)``). ``clock``: seconds.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        sync: Callable[[], None],
        module_types: tuple[type, ...] = (ContextParallelCrossAttention,),
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self._sync, self._clock = sync, clock
        self.active = False
        self.seconds = 0.0
        self._handles = []
        for module in model.modules():
            if isinstance(module, module_types):
                self._handles.append(module.register_forward_pre_hook(self._before, with_kwargs=True))
                self._handles.append(module.register_forward_hook(self._after))

    def _now(self) -> float:
        self._sync()
        return self._clock()

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


class StepTimer:
    """Mean time of a logging interval's ordinary steps, and cross-attention's share of the sampled ones.

    Steps whose iteration is a multiple of ``sample_every`` (0: none) run with ``xattn`` on; they
    are timed on their own and left out of the step time. ``sync`` waits for the device; ``clock``:
    seconds.
    """

    def __init__(
        self,
        xattn: CrossAttentionTimer,
        sample_every: int,
        sync: Callable[[], None],
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.xattn, self.sample_every, self.sync, self.clock = xattn, sample_every, sync, clock
        self._since: float | None = None  # start of the running stretch of ordinary steps
        self._sampled_start = 0.0
        self._reset()

    def _reset(self) -> None:
        self.steps = self.sampled_steps = 0
        self.seconds = self.sampled_seconds = self.xattn_seconds = 0.0

    def pause(self) -> None:
        """End the running stretch of steps (before other work, e.g. evaluation); synchronises once."""
        if self._since is not None:
            self.sync()
            self.seconds += self.clock() - self._since
            self._since = None

    def start_step(self, iteration: int) -> None:
        """Before the step numbered ``iteration`` (1-based)."""
        if self.sample_every and iteration % self.sample_every == 0:
            self.pause()
            self.xattn.start()
            self._sampled_start = self.clock()
        elif self._since is None:
            self.sync()  # the work before this stretch (a previous one, evaluation) is not its time
            self._since = self.clock()

    def end_step(self) -> None:
        """After the step begun by :meth:`start_step`."""
        if self.xattn.active:
            self.sync()
            self.sampled_seconds += self.clock() - self._sampled_start
            self.xattn_seconds += self.xattn.stop()
            self.sampled_steps += 1
        else:
            self.steps += 1

    def interval(self) -> dict[str, float]:
        """``step_s`` (mean seconds of the ordinary steps since the last call; absent without one) and
        ``xattn_time_share`` (of the sampled steps; absent without one). Synchronises once."""
        self.pause()
        out = {}
        if self.steps:
            out["step_s"] = self.seconds / self.steps
        if self.sampled_steps:
            out["xattn_time_share"] = self.xattn_seconds / self.sampled_seconds
        self._reset()
        return out
