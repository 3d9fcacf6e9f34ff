"""Block attention on our Triton kernels (:mod:`.triton_kernels`): split-KV forward, GQA packed rows,
masked calls walking the tile lists of their :class:`~lvx_megatron.ops.masks.BlockMask` (or, when the
mask only hides some rows from everything, the unmasked kernels on the other rows; or, for a forward
whose tile lists hold partial tiles and whose text rows form a few runs that each see one key range,
one unmasked launch per run).

Runs on CUDA tensors, or on CPU tensors under Triton's interpreter (``TRITON_INTERPRET=1``, set
before Triton is first imported), which is how CI checks the kernels' logic without a GPU.
"""

import os
from dataclasses import dataclass

import torch
from torch import Tensor

from ..masks import MaskOrAll
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
    """Tile sizes and launch parameters of one kernel; ``waves``: the split-KV kernels' target
    thread blocks per SM (the ``dK``/``dV`` kernel does not split)."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    waves: float = 2.0


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _pow2(x: int) -> int:
    return 1 << max(x - 1, 0).bit_length()


def _wide(head_dim: int, dtype: torch.dtype) -> bool:
    """Tiles of fp32 or head dims above 128 need about twice the shared memory: halve them."""
    return dtype == torch.float32 or head_dim > 128


def forward_config(rows: int, head_dim: int, dtype: torch.dtype) -> KernelConfig:
    """Tiles of the forward kernel for ``rows`` packed query rows per key/value head.

    From ``tools/bench_block_attention.py --sweep`` (bf16, d=128; docs/ops.md names the results
    file): 128-row tiles, 8 warps, 4 stages and two waves of splits for short query blocks; 64-row
    tiles, 4 warps and one wave for tall ones (with more rows per K/V head there is enough work
    without splitting the keys further).
    """
    if _wide(head_dim, dtype):
        return KernelConfig(64, 32, 4, 2)
    return KernelConfig(128, 64, 8, 4) if rows <= 512 else KernelConfig(64, 64, 4, 3, waves=1.0)


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


@dataclass(frozen=True)
class _MaskArguments:
    """What a kernel launch takes for its mask: ``pointers`` ``QBITS, KV_IDS, FULL_CNT, RUN_CNT,
    RUN_START, RUN_LEN, RUN_POS, PART_CNT, PART_IDX``, ``strides`` ``stride_bb, stride_bq, stride_ib,
    stride_cb, stride_xb, stride_xt``, and the constants ``MASK_MODE``, ``NUM_WORDS``, ``HAS_PARTIAL``."""

    pointers: list
    strides: list
    constants: dict


def _mask_arguments(
    mask: MaskOrAll, q: Tensor, group: int, block_m: int, block_n: int, by_keys: bool
) -> _MaskArguments:
    """The mask arguments of a call; the tile lists are those of this kernel's tiles."""
    if mask is None:
        return _MaskArguments([q] * 9, [0] * 6, dict(MASK_MODE=0, NUM_WORDS=1, HAS_PARTIAL=False))
    ids = mask.key_ids()
    t = mask.tiles(group, block_m, block_n, by_keys)
    lists = [t.full_count, t.run_count, t.run_start, t.run_length, t.run_position, t.partial_count, t.partial_index]
    list_strides = [t.full_count.stride(0), t.partial_index.stride(0), t.partial_index.stride(1)]
    partial = mask.has_partial_tiles(group, block_m, block_n)
    if mask.q_image_mask is None:
        constants = dict(MASK_MODE=3, NUM_WORDS=1, HAS_PARTIAL=partial)
        return _MaskArguments([q, ids, *lists], [0, 0, ids.stride(0), *list_strides], constants)
    bits = mask.image_bits()
    constants = dict(MASK_MODE=2, NUM_WORDS=bits.shape[-1], HAS_PARTIAL=partial)
    strides = [bits.stride(0), bits.stride(1), ids.stride(0), *list_strides]
    return _MaskArguments([bits, ids, *lists], strides, constants)


def seeing_rows(mask: MaskOrAll) -> tuple[int, int] | None:
    """``(first, end)`` when the only masking is text rows outside that run seeing nothing (every
    sample: one dense run over all keys, the same rows), else None. Such a block runs the unmasked
    kernels on its seeing rows: no tile lists at all (the models' video masks: every token after
    the first frame's sees every frame)."""
    if mask is None:
        return None
    skv = mask.kv_image_ids.shape[1]
    runs = mask.dense_runs()
    first = runs[0] if runs else []
    if len(first) != 1 or first[0][2] != ((0, skv),) or any(r != first for r in runs[1:]):
        return None
    return first[0][0], first[0][1]


MAX_RUN_LAUNCHES = 8  # the most unmasked launches a forward by dense runs takes


def single_range_runs(mask: MaskOrAll) -> list[list[tuple[int, int, int, int]]] | None:
    """Per sample, ``(first row, end row, first key, end key)`` of each dense run, when every run
    sees one contiguous key range and all samples together have at most :data:`MAX_RUN_LAUNCHES`
    runs (the multi-image layout: text segment ``i`` sees images up to ``i``), else None."""
    if mask is None:
        return None
    runs = mask.dense_runs()
    if sum(len(r) for r in runs) > MAX_RUN_LAUNCHES or any(len(keys) != 1 for r in runs for _, _, keys in r):
        return None
    return [[(r0, r1, keys[0][0], keys[0][1]) for r0, r1, keys in sample] for sample in runs]


class TritonBackend(BlockAttentionBackend):
    """Our Triton kernels behind the block-attention interface (fp16, bf16, fp32; any head dim up to 256).

    Args:
        forward_tiles, dkdv_tiles, dq_tiles: override the tile choice of each kernel (benchmark
            sweeps); by default chosen per shape.
    """

    name = "triton"

    def __init__(
        self,
        forward_tiles: KernelConfig | None = None,
        dkdv_tiles: KernelConfig | None = None,
        dq_tiles: KernelConfig | None = None,
    ) -> None:
        self.forward_tiles = forward_tiles
        self.dkdv_tiles = dkdv_tiles
        self.dq_tiles = dq_tiles

    @staticmethod
    def _check(q: Tensor) -> None:
        reason = triton_unavailable_reason(q.device)
        if reason is not None:
            raise ValueError(reason)
        if q.dtype not in _DTYPES:
            raise ValueError(f"the Triton backend takes dtypes {_DTYPES}, got {q.dtype}")
        if q.shape[-1] > 256:
            raise ValueError(f"the Triton backend takes head dims up to 256, got {q.shape[-1]}")

    def forward(self, q: Tensor, k: Tensor, v: Tensor, mask: MaskOrAll, scale: float) -> tuple[Tensor, Tensor]:
        self._check(q)
        rows = seeing_rows(mask)
        if rows is None:
            runs = self._runs_instead_of_partial_tiles(q, k, mask)
            if runs is not None:
                return self._forward_runs(q, k, v, runs, scale)
            return self._forward(q, k, v, mask, scale)
        if rows == (0, q.shape[1]):
            return self._forward(q, k, v, None, scale)
        o = torch.zeros_like(q)
        lse = q.new_full(q.shape[:3], float("-inf"), dtype=torch.float32)
        o[:, rows[0] : rows[1]], lse[:, rows[0] : rows[1]] = self._forward(q[:, rows[0] : rows[1]], k, v, None, scale)
        return o, lse

    def _runs_instead_of_partial_tiles(self, q: Tensor, k: Tensor, mask: MaskOrAll) -> list | None:
        """The dense runs a masked forward takes instead of its tile lists: when those hold partial
        tiles and the runs are few single key ranges. A partial tile costs several full ones (per-row
        bits, sanitised V, an indirect walk), and a text segment that ends inside a row tile makes
        every tile of the next image partial for that row tile: the multi-image layout's forward took
        longer than the all-visible one (``tools/bench_block_attention.py``, mask ``segments``). The
        backward keeps the tile lists: it reads the global LSE, so its tiles need not match."""
        if mask is None:
            return None
        tiles = self._forward_tiles(q, k)
        if not mask.has_partial_tiles(q.shape[2] // k.shape[2], tiles.block_m, tiles.block_n):
            return None
        return single_range_runs(mask)

    def _forward_tiles(self, q: Tensor, k: Tensor) -> KernelConfig:
        """The forward kernel's tiles for these shapes (the override, else the shape's default)."""
        return self.forward_tiles or forward_config(q.shape[2] // k.shape[2] * q.shape[1], q.shape[-1], q.dtype)

    def _forward_runs(self, q: Tensor, k: Tensor, v: Tensor, runs: list, scale: float) -> tuple[Tensor, Tensor]:
        """The forward as one unmasked launch per dense run (rows outside every run see nothing)."""
        o = torch.zeros_like(q)
        lse = q.new_full(q.shape[:3], float("-inf"), dtype=torch.float32)
        for b, sample in enumerate(runs):
            for r0, r1, k0, k1 in sample:
                o[b : b + 1, r0:r1], lse[b : b + 1, r0:r1] = self._forward(
                    q[b : b + 1, r0:r1], k[b : b + 1, k0:k1], v[b : b + 1, k0:k1], None, scale
                )
        return o, lse

    def _forward(self, q: Tensor, k: Tensor, v: Tensor, mask: MaskOrAll, scale: float) -> tuple[Tensor, Tensor]:
        from .triton_kernels import _combine_kernel, _fwd_kernel

        b, sq, hq, d = q.shape
        skv, hkv = k.shape[1], k.shape[2]
        if sq == 0 or skv == 0 or b == 0:
            return q.new_zeros(q.shape), q.new_full((b, sq, hq), float("-inf"), dtype=torch.float32)
        # The kernels write every element (rows that see nothing: 0 and -inf), so no fill is needed.
        o = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        lse = torch.empty((b, sq, hq), dtype=torch.float32, device=q.device)
        q, k, v = _rows_view(q), _rows_view(k), _rows_view(v)
        g, rows = hq // hkv, hq // hkv * sq
        tiles = self._forward_tiles(q, k)
        row_blocks = _cdiv(rows, tiles.block_m)
        splits, split_len = _split(row_blocks * b * hkv, skv, q.device, tiles.waves)
        masking = _mask_arguments(mask, q, g, tiles.block_m, tiles.block_n, False)
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
            q, k, v, *masking.pointers, o_out, lse_out, scale, sq, skv, split_len, splits,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), *masking.strides, *out_strides,
            HKV=hkv, G=g, HEAD_DIM=d, BLOCK_D=block_d, BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n,
            **masking.constants, DIRECT=direct, IEEE=q.dtype == torch.float32,
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
        self, dout: Tensor, q: Tensor, k: Tensor, v: Tensor, lse: Tensor, delta: Tensor, mask: MaskOrAll, scale: float
    ) -> tuple[Tensor, Tensor, Tensor]:
        """``dq`` comes back in fp32 (it is accumulated atomically); ``dk``/``dv`` in the input dtype."""
        self._check(q)
        rows = seeing_rows(mask)
        if rows is None:
            return self._backward(dout, q, k, v, lse, delta, mask, scale)
        r0, r1 = rows
        if rows == (0, q.shape[1]):
            return self._backward(dout, q, k, v, lse, delta, None, scale)
        dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        dq[:, r0:r1], dk, dv = self._backward(
            dout[:, r0:r1], q[:, r0:r1], k, v, lse[:, r0:r1], delta[:, r0:r1], None, scale
        )
        return dq, dk, dv

    def _backward(
        self, dout: Tensor, q: Tensor, k: Tensor, v: Tensor, lse: Tensor, delta: Tensor, mask: MaskOrAll, scale: float
    ) -> tuple[Tensor, Tensor, Tensor]:
        from .triton_kernels import _bwd_dkdv_kernel, _bwd_dq_kernel

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
        shared = [
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), dout.stride(0), dout.stride(1), dout.stride(2),
            lse.stride(0), lse.stride(1), lse.stride(2), delta.stride(0), delta.stride(1), delta.stride(2),
        ]  # fmt: skip
        constants = dict(HKV=hkv, G=g, HEAD_DIM=d, BLOCK_D=max(16, _pow2(d)), IEEE=q.dtype == torch.float32)
        tiles = self.dkdv_tiles or dkdv_config(d, q.dtype)
        masking = _mask_arguments(mask, q, g, tiles.block_m, tiles.block_n, True)
        _bwd_dkdv_kernel[(_cdiv(skv, tiles.block_n), b * hkv)](
            q, k, v, dout, lse, delta, *masking.pointers, dk, dv, scale, sq, skv,
            *shared, *masking.strides, dk.stride(0), dk.stride(1), dk.stride(2),
            BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, **masking.constants,
            num_warps=tiles.num_warps, num_stages=tiles.num_stages, **constants,
        )  # fmt: skip
        tiles = self.dq_tiles or dq_config(d, q.dtype)
        row_blocks = _cdiv(rows, tiles.block_m)
        splits, split_len = _split(row_blocks * b * hkv, skv, q.device, tiles.waves)
        masking = _mask_arguments(mask, q, g, tiles.block_m, tiles.block_n, False)
        _bwd_dq_kernel[(row_blocks, splits, b * hkv)](
            q, k, v, dout, lse, delta, *masking.pointers, dq, scale, sq, skv, split_len, splits,
            *shared, *masking.strides, dq.stride(0), dq.stride(1), dq.stride(2),
            BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, **masking.constants,
            num_warps=tiles.num_warps, num_stages=tiles.num_stages, **constants,
        )  # fmt: skip
        return dq, dk, dv
