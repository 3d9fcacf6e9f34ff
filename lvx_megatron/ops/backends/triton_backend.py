"""Block attention on our Triton kernels (:mod:`.triton_kernels`): split-KV forward, GQA packed rows,
the compact image-id mask read in the kernel.

Runs on CUDA tensors, or on CPU tensors under Triton's interpreter (``TRITON_INTERPRET=1``, set
before Triton is first imported), which is how CI checks the kernels' logic without a GPU.
"""

import os
from dataclasses import dataclass

import torch
from torch import Tensor

from ..masks import BlockMask
from .base import BlockAttentionBackend

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_SPLIT_ALIGN = 256  # split lengths are multiples of every key tile size used


def interpreter_enabled() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_unavailable_reason(device: torch.device) -> str | None:
    """Why the Triton backend cannot run on ``device`` (None when it can)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return "the triton package is not installed"
    if device.type == "cuda":
        return None
    if device.type == "cpu" and interpreter_enabled():
        return None
    return f"the Triton backend needs CUDA tensors (or CPU tensors with TRITON_INTERPRET=1), got device {device}"


@dataclass(frozen=True)
class KernelConfig:
    """Tile sizes and launch parameters of one kernel."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _pow2(x: int) -> int:
    return 1 << max(x - 1, 0).bit_length()


def _wide(head_dim: int, dtype: torch.dtype) -> bool:
    """Tiles of fp32 or head dims above 128 need about twice the shared memory: halve them."""
    return dtype == torch.float32 or head_dim > 128


def forward_config(rows: int, head_dim: int, dtype: torch.dtype) -> KernelConfig:
    """Tiles of the forward kernel for ``rows`` packed query rows per key/value head.

    Chosen on an H100 (bf16, d=128) with ``tools/bench_block_attention.py --sweep``: 128-row tiles,
    8 warps and 4 stages for short query blocks, 64-row tiles and 4 warps for tall ones.
    """
    if _wide(head_dim, dtype):
        return KernelConfig(64, 32, 4, 2)
    return KernelConfig(128, 64, 8, 4) if rows <= 512 else KernelConfig(64, 64, 4, 3)


def dkdv_config(head_dim: int, dtype: torch.dtype) -> KernelConfig:
    """Tiles of the ``dK``/``dV`` kernel (``block_n`` keys per program, ``block_m`` rows per step)."""
    return KernelConfig(32, 32, 4, 1) if _wide(head_dim, dtype) else KernelConfig(64, 64, 4, 2)


def dq_config(head_dim: int, dtype: torch.dtype) -> KernelConfig:
    """Tiles of the split-KV ``dQ`` kernel."""
    return KernelConfig(64, 32, 4, 2) if _wide(head_dim, dtype) else KernelConfig(128, 64, 8, 3)


def num_splits(programs: int, skv: int, device: torch.device, waves: float = 2.0) -> int:
    """How many KV splits give about ``waves`` thread blocks per SM (at least 256 keys each)."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    wanted = max(1, _cdiv(int(waves * sms), max(programs, 1)))
    return max(1, min(wanted, _cdiv(skv, _SPLIT_ALIGN)))


def _split(programs: int, skv: int, device: torch.device, waves: float) -> tuple[int, int]:
    """``(splits, split_len)``: split lengths are whole multiples of every key tile size."""
    splits = num_splits(programs, skv, device, waves)
    split_len = _cdiv(_cdiv(skv, splits), _SPLIT_ALIGN) * _SPLIT_ALIGN
    return _cdiv(skv, split_len), split_len


def _rows_view(x: Tensor) -> Tensor:
    """``x`` with a contiguous last dimension (the kernels index it without a stride)."""
    return x if x.stride(-1) == 1 else x.contiguous()


def pack_image_bits(q_image_mask: Tensor) -> Tensor:
    """``[B, Sq, N]`` bool -> ``[B, Sq, ceil(N / 32)]`` int32 bitsets (bit ``i % 32`` of word ``i // 32``)."""
    b, sq, n = q_image_mask.shape
    words = max(_cdiv(n, 32), 1)
    padded = q_image_mask.new_zeros(b, sq, words * 32)
    padded[..., :n] = q_image_mask
    weights = torch.ones(32, dtype=torch.int64, device=q_image_mask.device) << torch.arange(
        32, device=q_image_mask.device
    )
    packed = (padded.view(b, sq, words, 32).to(torch.int64) * weights).sum(-1)
    return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)


def _mask_arguments(mask: Tensor | BlockMask | None, q: Tensor) -> tuple[int, int, list]:
    """``(MASK_MODE, NUM_WORDS, [MASK, QBITS, KV_IDS, stride_mb, stride_mq, stride_bb, stride_bq, stride_ib])``."""
    if mask is None:
        return 0, 1, [q, q, q, 0, 0, 0, 0, 0]
    if isinstance(mask, Tensor):
        dense = _rows_view(mask.view(torch.uint8) if mask.dtype == torch.bool else mask.to(torch.uint8))
        return 1, 1, [dense, q, q, dense.stride(0), dense.stride(1), 0, 0, 0]
    ids = mask.kv_image_ids.to(torch.int32).contiguous()
    if mask.q_image_mask is None:
        return 3, 1, [q, q, ids, 0, 0, 0, 0, ids.stride(0)]
    bits = pack_image_bits(mask.q_image_mask.bool())
    return 2, bits.shape[-1], [q, bits, ids, 0, 0, bits.stride(0), bits.stride(1), ids.stride(0)]


class TritonBackend(BlockAttentionBackend):
    """Our Triton kernels behind the block-attention interface (fp16, bf16, fp32; any head dim up to 256).

    Args:
        forward_tiles, dkdv_tiles, dq_tiles: override the tile choice of each kernel (benchmark
            sweeps); by default chosen per shape.
        waves: target thread blocks per SM of the split-KV kernels (forward and ``dQ``).
        skip_empty_tiles: with a mask, test each key tile and skip those no query row sees. A win
            when most keys are hidden (heavy tile padding, many images per text); off by default
            because the test keeps the key loads out of the software pipeline, which makes dense
            masks slower (measured: docs/ops.md, from the block-attention benchmark's results).
    """

    name = "triton"

    def __init__(
        self,
        forward_tiles: KernelConfig | None = None,
        dkdv_tiles: KernelConfig | None = None,
        dq_tiles: KernelConfig | None = None,
        waves: float = 2.0,
        skip_empty_tiles: bool = False,
    ) -> None:
        self.forward_tiles = forward_tiles
        self.dkdv_tiles = dkdv_tiles
        self.dq_tiles = dq_tiles
        self.waves = waves
        self.skip_empty_tiles = skip_empty_tiles

    @staticmethod
    def _check(q: Tensor) -> None:
        reason = triton_unavailable_reason(q.device)
        if reason is not None:
            raise ValueError(reason)
        if q.dtype not in _DTYPES:
            raise ValueError(f"the Triton backend takes dtypes {_DTYPES}, got {q.dtype}")
        if q.shape[-1] > 256:
            raise ValueError(f"the Triton backend takes head dims up to 256, got {q.shape[-1]}")

    def forward(
        self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | BlockMask | None, scale: float
    ) -> tuple[Tensor, Tensor]:
        from .triton_kernels import _combine_kernel, _fwd_kernel

        self._check(q)
        b, sq, hq, d = q.shape
        skv, hkv = k.shape[1], k.shape[2]
        if sq == 0 or skv == 0 or b == 0:
            return q.new_zeros(q.shape), q.new_full((b, sq, hq), float("-inf"), dtype=torch.float32)
        # The kernels write every element (rows that see nothing: 0 and -inf), so no fill is needed.
        o = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        lse = torch.empty((b, sq, hq), dtype=torch.float32, device=q.device)
        q, k, v = _rows_view(q), _rows_view(k), _rows_view(v)
        g, rows = hq // hkv, hq // hkv * sq
        tiles = self.forward_tiles or forward_config(rows, d, q.dtype)
        row_blocks = _cdiv(rows, tiles.block_m)
        splits, split_len = _split(row_blocks * b * hkv, skv, q.device, self.waves)
        mode, words, mask_args = _mask_arguments(mask, q)
        direct = splits == 1
        if direct:
            o_out, lse_out = o, lse
            out_strides = [o.stride(0), o.stride(1), o.stride(2), lse.stride(0), lse.stride(1), lse.stride(2)]
        else:
            o_out = torch.empty(b * hkv, splits, rows, d, dtype=torch.float32, device=q.device)
            lse_out = torch.empty(b * hkv, splits, rows, dtype=torch.float32, device=q.device)
            out_strides = [o_out.stride(0), o_out.stride(1), o_out.stride(2), lse_out.stride(0), lse_out.stride(1), 0]
        block_d = max(16, _pow2(d))
        _fwd_kernel[(row_blocks, splits, b * hkv)](
            q, k, v, *mask_args[:3], o_out, lse_out, scale, sq, skv, split_len,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), *mask_args[3:], *out_strides,
            HKV=hkv, G=g, HEAD_DIM=d, BLOCK_D=block_d, BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n,
            MASK_MODE=mode, NUM_WORDS=words, SKIP=self.skip_empty_tiles and mode != 0, DIRECT=direct,
            IEEE=q.dtype == torch.float32,
            num_warps=tiles.num_warps, num_stages=tiles.num_stages,
        )  # fmt: skip
        if not direct:
            combine_m = 64
            _combine_kernel[(_cdiv(rows, combine_m), b * hkv)](
                o_out, lse_out, o, lse, sq, splits,
                o_out.stride(0), o_out.stride(1), o_out.stride(2), lse_out.stride(0), lse_out.stride(1),
                o.stride(0), o.stride(1), o.stride(2), lse.stride(0), lse.stride(1), lse.stride(2),
                HKV=hkv, G=g, HEAD_DIM=d, BLOCK_D=block_d, BLOCK_M=combine_m, num_warps=4,
            )  # fmt: skip
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
        """``dq`` comes back in fp32 (it is accumulated atomically); ``dk``/``dv`` in the input dtype."""
        from .triton_kernels import _bwd_dkdv_kernel, _bwd_dq_kernel

        self._check(q)
        b, sq, hq, d = q.shape
        skv, hkv = k.shape[1], k.shape[2]
        dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        if sq == 0 or skv == 0 or b == 0:
            return dq, torch.zeros_like(k), torch.zeros_like(v)
        q, k, v = _rows_view(q), _rows_view(k), _rows_view(v)
        dout = _rows_view(dout.to(q.dtype))
        lse, delta = lse.float(), delta.float()
        dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
        dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
        g, rows = hq // hkv, hq // hkv * sq
        mode, words, mask_args = _mask_arguments(mask, q)
        shared = [
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), dout.stride(0), dout.stride(1), dout.stride(2),
            lse.stride(0), lse.stride(1), lse.stride(2), delta.stride(0), delta.stride(1), delta.stride(2),
            *mask_args[3:],
        ]  # fmt: skip
        constants = dict(HKV=hkv, G=g, HEAD_DIM=d, BLOCK_D=max(16, _pow2(d)), MASK_MODE=mode, NUM_WORDS=words)
        constants.update(SKIP=self.skip_empty_tiles and mode != 0, IEEE=q.dtype == torch.float32)
        tiles = self.dkdv_tiles or dkdv_config(d, q.dtype)
        _bwd_dkdv_kernel[(_cdiv(skv, tiles.block_n), b * hkv)](
            q, k, v, dout, lse, delta, *mask_args[:3], dk, dv, scale, sq, skv,
            *shared, dk.stride(0), dk.stride(1), dk.stride(2),
            BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, num_warps=tiles.num_warps, num_stages=tiles.num_stages,
            **constants,
        )  # fmt: skip
        tiles = self.dq_tiles or dq_config(d, q.dtype)
        row_blocks = _cdiv(rows, tiles.block_m)
        splits, split_len = _split(row_blocks * b * hkv, skv, q.device, self.waves)
        _bwd_dq_kernel[(row_blocks, splits, b * hkv)](
            q, k, v, dout, lse, delta, *mask_args[:3], dq, scale, sq, skv, split_len,
            *shared, dq.stride(0), dq.stride(1), dq.stride(2),
            BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, num_warps=tiles.num_warps, num_stages=tiles.num_stages,
            **constants,
        )  # fmt: skip
        return dq, dk, dv
