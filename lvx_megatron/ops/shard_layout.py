"""Shard sizes of every rank, exchanged once per call and checked for consistency."""

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
_FIELDS = (
    "Sq_local",
    "Skv_local",
    "batch",
    "Hq",
    "Hkv",
    "head_dim",
    "dtype",
    "head_chunks",
)
_MUST_MATCH = _FIELDS[2:]


@dataclass(frozen=True)
class ShardLayout:
    """Per-rank text and visual shard lengths of one distributed call."""

    q_lens: tuple[int, ...]
    kv_lens: tuple[int, ...]

    @property
    def world_size(self) -> int:
        return len(self.q_lens)


def _readable(name: str, value: int) -> object:
    """A field's exchanged integer as the caller wrote it (dtype, None for an absent head_chunks)."""
    if name == "dtype" and value >= 0:
        return _DTYPES[value]
    if name == "head_chunks" and value < 0:
        return None
    return value


def exchange_layout(
    q: Tensor, k: Tensor, group: dist.ProcessGroup | None, world_size: int, head_chunks: int | None = None
) -> ShardLayout:
    """All-gather every rank's shard lengths and check that the rest of the shapes agree.

    Raises ValueError on every rank (so none is left waiting) when batch, heads, head dim, dtype or
    the requested ``head_chunks`` differ between ranks (the mask's own fields are checked by
    :meth:`~.mask_plan.MaskPlan.build`).
    """
    mine = [
        q.shape[1],
        k.shape[1],
        q.shape[0],
        q.shape[2],
        k.shape[2],
        q.shape[3],
        _DTYPES.index(q.dtype) if q.dtype in _DTYPES else -1,
        -1 if head_chunks is None else head_chunks,
    ]
    if world_size == 1:
        return ShardLayout((mine[0],), (mine[1],))
    device = q.device if dist.get_backend(group) == "nccl" else torch.device("cpu")
    local = torch.tensor(mine, dtype=torch.int64, device=device)
    gathered = [torch.empty_like(local) for _ in range(world_size)]
    dist.all_gather(gathered, local, group=group)
    table = torch.stack(gathered).cpu().tolist()
    for i, name in enumerate(_FIELDS):
        if name in _MUST_MATCH and len({row[i] for row in table}) > 1:
            values = {r: _readable(name, row[i]) for r, row in enumerate(table)}
            raise ValueError(f"{name} must be the same on every rank of the group, got {values} (rank: value)")
    return ShardLayout(tuple(row[0] for row in table), tuple(row[1] for row in table))
