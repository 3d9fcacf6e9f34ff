"""NaN and Inf in visual K/V that a text row does not see never reach that row, in every strategy.

Real batches carry uninitialised padding (``kv_image_ids == -1``) and images a text token may not
see; their keys and values must contribute nothing, not ``0 * NaN``. Checked on 3 gloo ranks against
the same call with finite K/V: keys no row sees leave every output and gradient bit-identical; a
value that only some rows see makes exactly those rows non-finite.
"""

import pytest
import torch

from lvx_megatron.launch import spawn_gloo
from lvx_megatron.ops import STRATEGIES, distributed_cross_attention

B, HQ, HKV, D, N_IDS = 2, 4, 2, 8, 4
Q_LENS, KV_LENS = (3, 4, 2), (6, 0, 7)
HIDDEN_ID = 3  # an image no text token sees


def _problem(poison: str):
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(B, sum(Q_LENS), HQ, D, generator=gen, dtype=torch.float64)
    k = torch.randn(B, sum(KV_LENS), HKV, D, generator=gen, dtype=torch.float64)
    v = torch.randn(B, sum(KV_LENS), HKV, D, generator=gen, dtype=torch.float64)
    dout = torch.randn(B, sum(Q_LENS), HQ, D, generator=gen, dtype=torch.float64)
    ids = torch.tensor([[0, 0, -1, 1, 1, 3, 2, 2, -1, 3, 0, 1, 2], [1, -1, -1, 0, 3, 3, 2, 1, 0, 0, -1, 2, 2]])
    q_mask = torch.rand(B, sum(Q_LENS), N_IDS, generator=gen) < 0.6
    q_mask[..., HIDDEN_ID] = False
    q_mask[:, 0] = False  # a row that sees nothing
    q_mask[:, 1:5, 2] = True  # image 2: seen by rows 1-4 only
    q_mask[:, 5:, 2] = False
    bad = float(poison)
    k_bad, v_bad = k.clone(), v.clone()
    hidden = (ids < 0) | (ids == HIDDEN_ID)
    k_bad[hidden], v_bad[hidden] = bad, bad
    partly = ids == 2
    v_bad[partly] = bad
    return q, k, v, k_bad, v_bad, dout, q_mask, ids, hidden


def _shard(t: torch.Tensor, lens: tuple[int, ...], rank: int) -> torch.Tensor:
    start = sum(lens[:rank])
    return t[:, start : start + lens[rank]].contiguous()


def _worker(rank: int, world_size: int, poison: str):
    q, k, v, k_bad, v_bad, dout, q_mask, ids, _ = _problem(poison)
    results = {}
    for strategy in sorted(STRATEGIES):
        runs = {}
        for name, (kk, vv) in (("clean", (k, v)), ("poisoned", (k_bad, v_bad))):
            leaves = [_shard(q, Q_LENS, rank), _shard(kk, KV_LENS, rank), _shard(vv, KV_LENS, rank)]
            leaves = [t.requires_grad_() for t in leaves]
            out = distributed_cross_attention(
                *leaves,
                strategy=strategy,
                q_image_mask=_shard(q_mask, Q_LENS, rank),
                kv_image_ids=_shard(ids, KV_LENS, rank),
            )
            grads = torch.autograd.grad(out, leaves, _shard(dout, Q_LENS, rank))
            runs[name] = (out.detach(), *grads)
        results[strategy] = runs
    return results


@pytest.mark.parametrize("poison", ["nan", "inf"])
def test_non_finite_hidden_keys_change_nothing_and_partly_seen_ones_only_their_rows(poison):
    *_, q_mask, _, hidden = _problem(poison)
    seeing = q_mask[..., 2]  # rows that see the partly poisoned image
    for rank, per_strategy in enumerate(spawn_gloo(3, _worker, poison)):
        rows = _shard(seeing.unsqueeze(-1), Q_LENS, rank)[..., 0]
        keys_hidden = _shard(hidden.unsqueeze(-1), KV_LENS, rank)[..., 0]
        for strategy, runs in per_strategy.items():
            (out, dq, dk, dv), (out_p, dq_p, dk_p, dv_p) = runs["clean"], runs["poisoned"]
            where = f"{strategy}, rank {rank}"
            assert torch.equal(out_p[~rows], out[~rows]), where
            assert torch.equal(dq_p[~rows], dq[~rows]), where
            assert (~torch.isfinite(out_p[rows])).flatten(1).all(1).all(), where
            # keys no row sees get exactly zero gradients, however poisoned
            assert (dk_p[keys_hidden] == 0).all() and (dv_p[keys_hidden] == 0).all(), where
            assert torch.equal(dk_p[keys_hidden], dk[keys_hidden]), where
            assert torch.equal(dv_p[keys_hidden], dv[keys_hidden]), where
