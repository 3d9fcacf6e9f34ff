"""Block attention on torch's fused CUDA kernels (flash and memory-efficient).

The LSE-returning aten entry points give ``(o, lse)`` per block. GQA heads are packed into the
row dimension (``[B, Hkv, G * Sq, D]`` against ``[B, Hkv, Skv, D]``), so K/V are read once per
key/value head and never expanded. Unmasked fp16/bf16 blocks run on cuDNN from about 8K query
rows in all (batch x K/V heads x packed rows) and on flash below; masked blocks (an additive
``-inf`` bias) and fp32 run on the memory-efficient kernel.

The fused backward kernels take the block's output ``O`` only to form ``rowsum(dO * O)``. The
distributed strategies carry the global ``delta`` instead of ``O`` (``D`` times smaller), so the
backward passes a surrogate output ``dO * delta / |dO|^2`` whose row sums with ``dO`` equal
``delta``; its norm never exceeds that of ``O`` (Cauchy-Schwarz), so it cannot overflow.
"""

import torch
from torch import Tensor

from ..masks import BlockMask, dense_mask
from ..merge import safe_lse
from .base import BlockAttentionBackend

_aten = torch.ops.aten
_EFFICIENT_LSE_ALIGN = 32
_BIAS_ALIGN = 16


def _round_up(x: int, m: int) -> int:
    return (x + m - 1) // m * m


def pack_heads(x: Tensor, hkv: int) -> Tensor:
    """``[B, Sq, Hq, D]`` -> ``[B, Hkv, G * Sq, D]`` (row ``g * Sq + i`` is query head ``h * G + g``)."""
    b, sq, hq, d = x.shape
    return x.view(b, sq, hkv, hq // hkv, d).permute(0, 2, 3, 1, 4).reshape(b, hkv, hq // hkv * sq, d)


def unpack_heads(x: Tensor, sq: int) -> Tensor:
    """Inverse of :func:`pack_heads`."""
    b, hkv, rows, d = x.shape
    g = rows // sq
    return x.view(b, hkv, g, sq, d).permute(0, 3, 1, 2, 4).reshape(b, sq, hkv * g, d)


def pack_stat(x: Tensor, hkv: int) -> Tensor:
    """``[B, Sq, Hq]`` -> ``[B, Hkv, G * Sq]``."""
    b, sq, hq = x.shape
    return x.view(b, sq, hkv, hq // hkv).permute(0, 2, 3, 1).reshape(b, hkv, hq // hkv * sq)


def unpack_stat(x: Tensor, sq: int) -> Tensor:
    """Inverse of :func:`pack_stat`."""
    b, hkv, rows = x.shape
    g = rows // sq
    return x.view(b, hkv, g, sq).permute(0, 3, 1, 2).reshape(b, sq, hkv * g)


def _rows_major(x: Tensor) -> Tensor:
    """``[B, H, M, D]`` with memory laid out as ``[B, M, H, D]``."""
    return x.transpose(1, 2).contiguous().transpose(1, 2)


def _heads_first(x: Tensor) -> Tensor:
    """``[B, S, H, D]`` -> ``[B, H, S, D]`` view (last dim stays contiguous)."""
    return x.transpose(1, 2)


# With GQA rows packed, cuDNN overtakes flash (forward and backward) from about this many query
# rows in all (batch x K/V heads x packed rows); below it flash is as fast or faster
# (H100, bf16, d=128: benchmarks/results/block_attention_h100.json).
_CUDNN_MIN_ROWS = 8192


def _cudnn_available(device: torch.device) -> bool:
    return (
        device.type == "cuda"
        and torch.backends.cudnn.is_available()
        and torch.backends.cuda.cudnn_sdp_enabled()
        and torch.cuda.get_device_capability(device) >= (8, 0)
    )


class TorchFusedBackend(BlockAttentionBackend):
    """torch's fused CUDA attention kernels behind the block-attention interface.

    Args:
        kernel: ``"auto"`` (unmasked fp16/bf16: cuDNN from about 8K query rows in all, flash
            below; masked blocks and fp32: memory-efficient), or one of ``"flash"``, ``"cudnn"``,
            ``"efficient"``.
    """

    name = "fused"
    KERNELS = ("auto", "flash", "cudnn", "efficient")

    def __init__(self, kernel: str = "auto") -> None:
        if kernel not in self.KERNELS:
            raise ValueError(f"kernel must be one of {self.KERNELS}, got {kernel!r}")
        self.kernel = kernel

    def _choose(self, q: Tensor, mask: Tensor | BlockMask | None, rows: int) -> str:
        """The kernel of one call: ``"flash"``, ``"cudnn"`` or ``"efficient"``."""
        d = q.shape[-1]
        low_precision = mask is None and q.dtype in (torch.float16, torch.bfloat16) and d % 8 == 0
        flash_ok = low_precision and d <= 256
        cudnn_ok = low_precision and d <= 128 and _cudnn_available(q.device)
        if self.kernel in ("flash", "cudnn") and not (flash_ok if self.kernel == "flash" else cudnn_ok):
            raise ValueError(
                f"the {self.kernel} kernel takes only unmasked fp16/bf16 blocks with head dim a multiple of 8 "
                f"up to {256 if self.kernel == 'flash' else 128}; use kernel='auto'"
            )
        if self.kernel != "auto":
            return self.kernel
        if cudnn_ok and q.shape[0] * rows >= _CUDNN_MIN_ROWS:
            return "cudnn"
        return "flash" if flash_ok else "efficient"

    @staticmethod
    def _bias(mask: Tensor, g: int, hkv: int, dtype: torch.dtype, rows_all_masked_to_zero: bool) -> Tensor:
        """Additive bias ``[B, Hkv, G * Sq, Skv]`` from a ``[B, Sq, Skv]`` mask.

        The last dimension is allocated padded to the kernel's alignment and sliced back; the
        head dimension is a stride-0 expansion. With ``rows_all_masked_to_zero`` rows with no
        visible key get a zero bias (the forward kernel would otherwise produce NaN; their
        results are overwritten afterwards).
        """
        b, sq, skv = mask.shape
        keep = mask
        if rows_all_masked_to_zero:
            keep = mask | ~mask.any(dim=-1, keepdim=True)
        bias = torch.zeros(b, 1, g, sq, _round_up(max(skv, 1), _BIAS_ALIGN), dtype=dtype, device=mask.device)
        bias[..., :skv].masked_fill_(~keep[:, None, None], float("-inf"))
        return bias.view(b, 1, g * sq, -1)[..., :skv].expand(b, hkv, g * sq, skv)

    def forward(
        self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | BlockMask | None, scale: float
    ) -> tuple[Tensor, Tensor]:
        b, sq, hq, _ = q.shape
        skv, hkv = k.shape[1], k.shape[2]
        if sq == 0 or skv == 0:
            return q.new_zeros(q.shape), q.new_full((b, sq, hq), float("-inf"), dtype=torch.float32)
        mask = dense_mask(mask)
        qp, kh, vh = pack_heads(q, hkv), _heads_first(k), _heads_first(v)
        kernel = self._choose(q, mask, hkv * qp.shape[2])
        if kernel == "flash":
            o, lse = _aten._scaled_dot_product_flash_attention(qp, kh, vh, scale=scale)[:2]
        elif kernel == "cudnn":
            o, lse = _aten._scaled_dot_product_cudnn_attention(qp, kh, vh, None, True, scale=scale)[:2]
            lse = lse.reshape(b, hkv, -1)  # cuDNN returns [B, H, M, 1]
        else:
            bias = None if mask is None else self._bias(mask, hq // hkv, hkv, q.dtype, True)
            o, lse = _aten._scaled_dot_product_efficient_attention(qp, kh, vh, bias, True, scale=scale)[:2]
        o = unpack_heads(o, sq)
        lse = unpack_stat(lse[..., : qp.shape[2]].float(), sq)
        if mask is not None:
            empty = ~mask.any(dim=-1).unsqueeze(-1)
            o = o.masked_fill(empty.unsqueeze(-1), 0.0)
            lse = lse.masked_fill(empty, float("-inf"))
        return o, lse

    def backward(
        self,
        dout: Tensor,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        lse: Tensor,
        delta: Tensor,
        mask: Tensor | BlockMask | None,
        scale: float,
    ) -> tuple[Tensor, Tensor, Tensor]:
        b, sq, hq, _ = q.shape
        skv, hkv = k.shape[1], k.shape[2]
        if sq == 0 or skv == 0:
            return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        mask = dense_mask(mask)
        dout = dout.to(q.dtype)
        norm2 = dout.float().square().sum(-1)
        coef = torch.where(norm2 > 0, delta.float() / norm2.clamp_min(torch.finfo(torch.float32).tiny), 0.0)
        surrogate_out = (dout.float() * coef.unsqueeze(-1)).to(q.dtype)
        qp, kh, vh = pack_heads(q, hkv), _heads_first(k), _heads_first(v)
        lse_p = pack_stat(safe_lse(lse.float()), hkv).contiguous()
        rows = qp.shape[2]
        seed = torch.zeros((), dtype=torch.int64, device=q.device)
        offset = torch.zeros((), dtype=torch.int64, device=q.device)
        kernel = self._choose(q, mask, hkv * rows)
        if kernel == "flash":
            dq, dk, dv = _aten._scaled_dot_product_flash_attention_backward(
                pack_heads(dout, hkv), qp, kh, vh, pack_heads(surrogate_out, hkv), lse_p,
                None, None, rows, skv, 0.0, False, seed, offset, scale=scale,
            )  # fmt: skip
        elif kernel == "cudnn":
            dq, dk, dv = _aten._scaled_dot_product_cudnn_attention_backward(
                pack_heads(dout, hkv), qp, kh, vh, pack_heads(surrogate_out, hkv), lse_p.unsqueeze(-1),
                seed, offset, None, None, None, rows, skv, 0.0, False, scale=scale,
            )  # fmt: skip
        else:
            # The memory-efficient backward reads O (and dO) as [B, M, H, D]-contiguous, the
            # layout its forward writes; hand it that layout viewed as [B, H, M, D].
            dop = _rows_major(pack_heads(dout, hkv))
            op = _rows_major(pack_heads(surrogate_out, hkv))
            lse_pad = lse_p.new_zeros(b, hkv, _round_up(rows, _EFFICIENT_LSE_ALIGN))
            lse_pad[..., :rows] = lse_p
            bias = None if mask is None else self._bias(mask, hq // hkv, hkv, q.dtype, False)
            dq, dk, dv, _ = _aten._scaled_dot_product_efficient_attention_backward(
                dop, qp, kh, vh, bias, op, lse_pad, seed, offset, 0.0, [True, True, True, False], False, scale=scale
            )
        return unpack_heads(dq, sq), dk.transpose(1, 2), dv.transpose(1, 2)
