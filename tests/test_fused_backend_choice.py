"""The fused backend's kernel choice and packing, checked without a GPU."""

import pytest
import torch

from lvx_megatron.ops import TorchFusedBackend
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
    mask = torch.ones(1, 4, 16, dtype=torch.bool)
    assert TorchFusedBackend()._choose(q, mask, 1 << 20) == "efficient"  # masks: memory-efficient
    assert TorchFusedBackend()._choose(q.float(), None, 1 << 20) == "efficient"  # fp32
    assert TorchFusedBackend()._choose(q, None, 1 << 20) == "flash"  # no cuDNN on a CPU tensor
    with pytest.raises(ValueError, match="the flash kernel takes only unmasked fp16/bf16"):
        TorchFusedBackend("flash")._choose(q, mask, 16)
    with pytest.raises(ValueError, match="the cudnn kernel takes only unmasked fp16/bf16"):
        TorchFusedBackend("cudnn")._choose(q, None, 16)
    with pytest.raises(ValueError, match="kernel must be one of"):
        TorchFusedBackend("triton")
