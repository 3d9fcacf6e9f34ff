"""Block attention on torch's fused CUDA kernels (cuDNN, flash and memory-efficient).

The LSE-returning aten entry points give ``(o, lse)`` per block. GQA heads are packed into the
row dimension (``[B, Hkv, G * Sq, D]`` against ``[B, Hkv, Skv, D]``), so K/V are read once per
key/value head and never expanded. fp16/bf16 blocks run on cuDNN from about 8K query rows in all
(batch x K/V heads x packed rows) and on flash below; fp32 on the memory-efficient kernel.

None of these kernels is given a mask. A masked block runs as its dense runs
(:meth:`~lvx_megatron.ops.masks.BlockMask.dense_runs`): each run of text rows sees a few key ranges
in full, and is one unmasked call on those rows against the ranges' K/V (a slice when there is one
range, the ranges gathered into one block otherwise; the backward scatters ``dK``/``dV`` back).
Keys outside every range (padding, images a row may not see) are never read, so NaN or Inf there
cannot reach any result. ``backend="auto"`` sends masks of many or short runs to the Triton kernels.

The fused backward kernels take the block's output ``O`` only to form ``rowsum(dO * O)``. The
distributed strategies carry the global ``delta`` instead of ``O`` (``D`` times smaller), so the
backward passes a surrogate output ``dO * delta / |dO|^2`` whose row sums with ``dO`` equal
``delta``; its norm never exceeds that of ``O`` (Cauchy-Schwarz), so it cannot overflow.
"""

import torch
from torch import Tensor

from ..masks import BlockMask, MaskOrAll
from ..merge import accumulation_dtype, safe_lse
from .base import BlockAttentionBackend

_aten = torch.ops.aten
_EFFICIENT_LSE_ALIGN = 32


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


# Up to this many key ranges are gathered and scattered as slices (one copy kernel each way);
# more go through one index kernel (whose scatter-add is slower per byte).
_SLICED_RANGES = 16


def _gather(x: Tensor, mask: BlockMask, sample: int, run: int) -> Tensor:
    """The keys of dense run ``run`` of ``sample`` (``[1, keys, H, D]``): a view for one range, else a copy."""
    keys = mask.dense_runs()[sample][run][2]
    if len(keys) == 1:
        return x[sample : sample + 1, keys[0][0] : keys[0][1]]
    if len(keys) <= _SLICED_RANGES:
        return torch.cat([x[sample : sample + 1, lo:hi] for lo, hi in keys], dim=1)
    return x[sample].index_select(0, mask.run_keys(sample, run)).unsqueeze(0)


def _scatter_add(total: Tensor, part: Tensor, mask: BlockMask, sample: int, run: int) -> None:
    """``total[sample, keys of the run] += part[0]`` (the inverse of :func:`_gather`)."""
    keys = mask.dense_runs()[sample][run][2]
    if len(keys) > _SLICED_RANGES:
        total[sample].index_add_(0, mask.run_keys(sample, run), part[0].to(total.dtype))
        return
    start = 0
    for lo, hi in keys:
        total[sample, lo:hi] += part[0, start : start + hi - lo]
        start += hi - lo


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
        kernel: ``"auto"`` (fp16/bf16: cuDNN from about 8K query rows in all, flash below;
            fp32: memory-efficient), or one of ``"flash"``, ``"cudnn"``, ``"efficient"``.
    """

    name = "fused"
    KERNELS = ("auto", "flash", "cudnn", "efficient")

    def __init__(self, kernel: str = "auto") -> None:
        if kernel not in self.KERNELS:
            raise ValueError(f"kernel must be one of {self.KERNELS}, got {kernel!r}")
        self.kernel = kernel

    def _choose(self, q: Tensor, rows: int) -> str:
        """The kernel of one unmasked call: ``"flash"``, ``"cudnn"`` or ``"efficient"``."""
        d = q.shape[-1]
        low_precision = q.dtype in (torch.float16, torch.bfloat16) and d % 8 == 0
        flash_ok = low_precision and d <= 256
        cudnn_ok = low_precision and d <= 128 and _cudnn_available(q.device)
        if self.kernel in ("flash", "cudnn") and not (flash_ok if self.kernel == "flash" else cudnn_ok):
            raise ValueError(
                f"the {self.kernel} kernel takes only fp16/bf16 blocks with head dim a multiple of 8 "
                f"up to {256 if self.kernel == 'flash' else 128}; use kernel='auto'"
            )
        if self.kernel != "auto":
            return self.kernel
        if cudnn_ok and q.shape[0] * rows >= _CUDNN_MIN_ROWS:
            return "cudnn"
        return "flash" if flash_ok else "efficient"

    def forward(self, q: Tensor, k: Tensor, v: Tensor, mask: MaskOrAll, scale: float) -> tuple[Tensor, Tensor]:
        if mask is None or mask.is_full():
            return self._dense_forward(q, k, v, scale)
        b, sq, hq, _ = q.shape
        o = torch.zeros_like(q)
        lse = torch.full((b, sq, hq), float("-inf"), dtype=torch.float32, device=q.device)
        for i, runs in enumerate(mask.dense_runs()):
            for j, (r0, r1, _) in enumerate(runs):
                rows = (slice(i, i + 1), slice(r0, r1))
                o[rows], lse[rows] = self._dense_forward(q[rows], _gather(k, mask, i, j), _gather(v, mask, i, j), scale)
        return o, lse

    def _dense_forward(self, q: Tensor, k: Tensor, v: Tensor, scale: float) -> tuple[Tensor, Tensor]:
        """``(o, lse)`` of a block in which every row sees every key."""
        b, sq, hq, _ = q.shape
        skv, hkv = k.shape[1], k.shape[2]
        if sq == 0 or skv == 0:
            return q.new_zeros(q.shape), q.new_full((b, sq, hq), float("-inf"), dtype=torch.float32)
        qp, kh, vh = pack_heads(q, hkv), _heads_first(k), _heads_first(v)
        kernel = self._choose(q, hkv * qp.shape[2])
        if kernel == "flash":
            o, lse = _aten._scaled_dot_product_flash_attention(qp, kh, vh, scale=scale)[:2]
        elif kernel == "cudnn":
            o, lse = _aten._scaled_dot_product_cudnn_attention(qp, kh, vh, None, True, scale=scale)[:2]
            lse = lse.reshape(b, hkv, -1)  # cuDNN returns [B, H, M, 1]
        else:
            o, lse = _aten._scaled_dot_product_efficient_attention(qp, kh, vh, None, True, scale=scale)[:2]
        return unpack_heads(o, sq), unpack_stat(lse[..., : qp.shape[2]].float(), sq)

    def backward(
        self, dout: Tensor, q: Tensor, k: Tensor, v: Tensor, lse: Tensor, delta: Tensor, mask: MaskOrAll, scale: float
    ) -> tuple[Tensor, Tensor, Tensor]:
        if mask is None or mask.is_full():
            return self._dense_backward(dout, q, k, v, lse, delta, scale)
        runs_per_sample = mask.dense_runs()
        dq = torch.zeros_like(q)
        # keys seen by several row runs sum several contributions: in the accumulation dtype then
        acc = accumulation_dtype(k.dtype) if any(len(runs) > 1 for runs in runs_per_sample) else k.dtype
        dk = torch.zeros(k.shape, dtype=acc, device=k.device)
        dv = torch.zeros(v.shape, dtype=acc, device=v.device)
        for i, runs in enumerate(runs_per_sample):
            for j, (r0, r1, _) in enumerate(runs):
                rows = (slice(i, i + 1), slice(r0, r1))
                dq[rows], run_dk, run_dv = self._dense_backward(
                    dout[rows], q[rows], _gather(k, mask, i, j), _gather(v, mask, i, j), lse[rows], delta[rows], scale
                )
                _scatter_add(dk, run_dk, mask, i, j)
                _scatter_add(dv, run_dv, mask, i, j)
        return dq, dk, dv

    def _dense_backward(
        self, dout: Tensor, q: Tensor, k: Tensor, v: Tensor, lse: Tensor, delta: Tensor, scale: float
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Gradients of a block in which every row sees every key, from the global statistics."""
        b, sq = q.shape[:2]
        skv, hkv = k.shape[1], k.shape[2]
        if sq == 0 or skv == 0:
            return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        dout = dout.to(q.dtype)
        norm2 = dout.float().square().sum(-1)
        coef = torch.where(norm2 > 0, delta.float() / norm2.clamp_min(torch.finfo(torch.float32).tiny), 0.0)
        surrogate_out = (dout.float() * coef.unsqueeze(-1)).to(q.dtype)
        qp, kh, vh = pack_heads(q, hkv), _heads_first(k), _heads_first(v)
        lse_p = pack_stat(safe_lse(lse.float()), hkv).contiguous()
        rows = qp.shape[2]
        seed = torch.zeros((), dtype=torch.int64, device=q.device)
        offset = torch.zeros((), dtype=torch.int64, device=q.device)
        kernel = self._choose(q, hkv * rows)
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
            dq, dk, dv, _ = _aten._scaled_dot_product_efficient_attention_backward(
                dop, qp, kh, vh, None, op, lse_pad, seed, offset, 0.0, [True, True, True, False], False, scale=scale
            )
        return unpack_heads(dq, sq), dk.transpose(1, 2), dv.transpose(1, 2)
