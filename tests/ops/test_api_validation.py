"""Bad input raises a ValueError naming the argument; mismatches across ranks fail on every rank."""

import pytest
import torch
import torch.distributed as dist

from lvx_megatron.launch import spawn_gloo
from lvx_megatron.ops import distributed_cross_attention, get_backend


def _qkv(b=1, sq=3, hq=4, hkv=2, skv=5, d=8, dtype=torch.float32):
    return (
        torch.randn(b, sq, hq, d, dtype=dtype),
        torch.randn(b, skv, hkv, d, dtype=dtype),
        torch.randn(b, skv, hkv, d, dtype=dtype),
    )


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda q, k, v: (q[0], k, v, {}), r"^q must be a 4-D tensor"),
        (lambda q, k, v: (q, k, v[:, :4], {}), r"k and v must have the same shape"),
        (lambda q, k, v: (q, k.double(), v.double(), {}), r"q, k and v must share a dtype"),
        (lambda q, k, v: (q.int(), k, v, {}), r"q must have a floating dtype"),
        (lambda q, k, v: (q[..., :3, :], k, v, {}), r"query heads of q \(3\) must be a multiple"),
        (lambda q, k, v: (q[..., :4], k, v, {}), r"same head dim"),
        (lambda q, k, v: (torch.cat([q, q]), k, v, {}), r"same batch size"),
        (
            lambda q, k, v: (q, k, v, {"strategy": "ulysses"}),
            r"strategy must be 'auto' or one of \['kv_allgather', 'kv_ring', 'q_allgather', 'query_ring'\]",
        ),
        (lambda q, k, v: (q, k, v, {"softmax_scale": -1.0}), r"softmax_scale must be a positive"),
        (
            lambda q, k, v: (q, k, v, {"q_image_mask": torch.ones(1, 3, 2, dtype=torch.bool)}),
            r"q_image_mask needs kv_image_ids",
        ),
        (
            lambda q, k, v: (
                q,
                k,
                v,
                {"q_image_mask": torch.ones(1, 3, 2), "kv_image_ids": torch.zeros(1, 5, dtype=torch.long)},
            ),
            r"q_image_mask must be a bool tensor \[B=1, Sq_local=3, N_ids\]",
        ),
        (
            lambda q, k, v: (q, k, v, {"kv_image_ids": torch.zeros(1, 4, dtype=torch.long)}),
            r"kv_image_ids must be an integer tensor \[B=1, Skv_local=5\]",
        ),
        (
            lambda q, k, v: (
                q,
                k,
                v,
                {"q_image_mask": torch.ones(1, 3, 2, dtype=torch.bool), "kv_image_ids": torch.full((1, 5), 2)},
            ),
            r"kv_image_ids values must be in \[-1, 1\]",
        ),
        (lambda q, k, v: (q, k, v, {"kv_image_ids": torch.full((1, 5), -2)}), r"kv_image_ids values must be in >= -1"),
        (lambda q, k, v: (q, k, v, {"backend": "tilelang"}), r"backend must be one of"),
    ],
)
def test_bad_input_raises_value_error(mutate, match):
    q, k, v, kwargs = mutate(*_qkv())
    with pytest.raises(ValueError, match=match):
        distributed_cross_attention(q, k, v, **kwargs)


def test_fused_backend_needs_cuda():
    with pytest.raises(ValueError, match="backend='fused' needs CUDA"):
        get_backend("fused", torch.device("cpu"), torch.float32)


def _mismatched_heads(rank: int, world_size: int) -> str:
    q, k, v = _qkv(hq=4 if rank == 0 else 8)
    try:
        distributed_cross_attention(q, k, v, group=dist.group.WORLD)
    except ValueError as err:
        return str(err)
    return "no error"


def test_shape_mismatch_between_ranks_fails_on_every_rank():
    messages = spawn_gloo(3, _mismatched_heads)
    assert all(m.startswith("Hq must be the same on every rank") and "{0: 4, 1: 8, 2: 8}" in m for m in messages)
