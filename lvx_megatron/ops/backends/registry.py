"""Every block-attention backend, registered once by name: ``backend=`` of the ops and the ``backend``
setting of every config read this.

Registering a backend is one entry in ``_FACTORIES``: its name and a function of the call's device
and dtype that returns the backend (or raises ValueError when it cannot run there).
"""

from collections.abc import Callable, Mapping
from types import MappingProxyType

import torch

from ..errors import SettingError
from .base import BlockAttentionBackend
from .fused import TorchFusedBackend
from .reference import TorchReferenceBackend
from .selecting import ShapeSelectingBackend
from .triton_backend import TritonBackend, triton_unavailable_reason

_SELECTING_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _auto(device: torch.device, dtype: torch.dtype) -> BlockAttentionBackend:
    """On CUDA (fp16/bf16/fp32) the per-call choice between our Triton kernels and torch's fused
    kernels; elsewhere (CPU, float64) the pure-torch backend."""
    if device.type == "cuda" and dtype in _SELECTING_DTYPES:
        return ShapeSelectingBackend()
    return TorchReferenceBackend()


def _fused(device: torch.device, dtype: torch.dtype) -> BlockAttentionBackend:
    if device.type != "cuda":
        raise ValueError(f"backend='fused' needs CUDA tensors, got device {device}")
    return TorchFusedBackend()


def _triton(device: torch.device, dtype: torch.dtype) -> BlockAttentionBackend:
    """Needs CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``."""
    reason = triton_unavailable_reason(device)
    if reason is not None:
        raise ValueError(f"backend='triton': {reason}")
    return TritonBackend()


_FACTORIES: dict[str, Callable[[torch.device, torch.dtype], BlockAttentionBackend]] = {
    "auto": _auto,
    "torch": lambda device, dtype: TorchReferenceBackend(),
    "fused": _fused,
    "triton": _triton,
}
BACKEND_FACTORIES: Mapping[str, Callable[[torch.device, torch.dtype], BlockAttentionBackend]] = MappingProxyType(
    _FACTORIES
)
BACKENDS = tuple(BACKEND_FACTORIES)


def check_backend_name(name: object, field: str, also: str = "") -> None:
    """SettingError naming ``field`` unless ``name`` is a registered backend (``also``: what else the
    field takes, for the message)."""
    if name not in BACKEND_FACTORIES:
        raise SettingError(field, f"must be one of {list(BACKENDS)}{also}, got {name!r}")


def get_backend(
    backend: "str | BlockAttentionBackend", device: torch.device, dtype: torch.dtype
) -> BlockAttentionBackend:
    """The registered backend named ``backend`` for tensors of ``device`` and ``dtype`` (an instance
    passes through); ValueError naming the backends, or why it cannot run there."""
    if isinstance(backend, BlockAttentionBackend):
        return backend
    check_backend_name(backend, "backend", also=" or a BlockAttentionBackend")
    return BACKEND_FACTORIES[backend](device, dtype)
