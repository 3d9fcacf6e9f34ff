"""The fused backend's kernel choice and packing, checked without a GPU."""

import pytest
import torch

from lvx_megatron.ops import BlockMask, TorchFusedBackend, TorchReferenceBackend
from lvx_megatron.ops.backends.fused import pack_heads, pack_stat, unpack_heads, unpack_stat


def test_gqa_packing_round_trips_and_groups_query_heads_by_kv_head():
    x = torch.randn(2, 5, 8, 4)
    packed = pack_heads(x, hkv=2)
    assert packed.shape == (2, 2, 4 * 5, 4)
    # Row g * Sq + i of K/V head h is query head h * G + g at position i.
    assert torch.equal(packed[1, 1, 3 * 5 + 2], x[1, 2, 1 * 4 + 3])
    assert torch.equal(unpack_heads(packed, 5), x)
    stat = torch.randn(2, 5, 8)
    assert torch.equal(unpack_stat(pack_stat(stat, 2), 5), stat)


def test_kernel_choice_and_its_errors():
    q = torch.randn(1, 4, 8, 64, dtype=torch.bfloat16)
    assert TorchFusedBackend()._choose(q.float(), 1 << 20) == "efficient"  # fp32
    assert TorchFusedBackend()._choose(q, 1 << 20) == "flash"  # no cuDNN on a CPU tensor
    with pytest.raises(ValueError, match="the flash kernel takes only fp16/bf16"):
        TorchFusedBackend("flash")._choose(q.float(), 16)
    with pytest.raises(ValueError, match="the cudnn kernel takes only fp16/bf16"):
        TorchFusedBackend("cudnn")._choose(q, 16)
    with pytest.raises(ValueError, match="kernel must be one of"):
        TorchFusedBackend("triton")


class _ReferenceDenseKernels(TorchFusedBackend):
    """The fused backend's mask handling with its dense kernel calls replaced by the float64 reference."""

    def _dense_forward(self, q, k, v, scale):
        return TorchReferenceBackend().forward(q, k, v, None, scale)

    def _dense_backward(self, dout, q, k, v, lse, delta, scale):
        return TorchReferenceBackend().backward(dout, q, k, v, lse, delta, None, scale)


@pytest.mark.parametrize("sorted_ids", [True, False])
def test_masked_blocks_run_as_dense_runs_exactly(sorted_ids):
    """A masked block as dense runs (rows sliced, key ranges gathered, dK/dV scattered back) gives the
    masked attention exactly, blind rows included; checked on CPU with reference dense kernels."""
    gen = torch.Generator().manual_seed(2)
    for trial in range(20):
        b, sq, hq, hkv, skv, d = 2, 9, 4, 2, 60, 8
        q, dout = (torch.randn(b, sq, hq, d, generator=gen, dtype=torch.float64) for _ in range(2))
        k, v = (torch.randn(b, skv, hkv, d, generator=gen, dtype=torch.float64) for _ in range(2))
        ids = torch.randint(-1, 5, (b, skv), generator=gen)
        if sorted_ids:
            ids = ids.sort(1).values
        q_mask = torch.rand(b, sq, 5, generator=gen) < 0.6
        q_mask[:, 1:4] = q_mask[:, :1]  # a run of identical rows
        q_mask[:, 5] = False  # a blind row
        mask = BlockMask(q_mask, ids, sq)
        ref = TorchReferenceBackend()
        o, lse = ref.forward(q, k, v, mask, 0.3)
        delta = (dout * o).sum(-1)
        grads = ref.backward(dout, q, k, v, lse, delta, mask, 0.3)
        o_runs, lse_runs = _ReferenceDenseKernels().forward(q, k, v, mask, 0.3)
        assert torch.allclose(o_runs, o, rtol=0, atol=1e-12), trial
        assert torch.equal(torch.isneginf(lse_runs), torch.isneginf(lse)) and (o_runs[:, 5] == 0).all()
        for got, want in zip(
            _ReferenceDenseKernels().backward(dout, q, k, v, lse, delta, mask, 0.3), grads, strict=True
        ):
            assert torch.allclose(got, want, rtol=0, atol=1e-12), trial
