"""The cross-attention mask of one micro-batch, gathered over the CP group once and reused by every layer.

A model builds one :class:`MaskPlan` per micro-batch from its sharded image mask (what
:func:`~.api.distributed_cross_attention` takes as ``mask_plan=``), and megatron's ``context_mask``
carries it to every cross-attention layer. Building it is the only collective and the only host
synchronisation the mask costs: the shard lengths and every rank's mask rows and image ids are
gathered once, the ids are checked once. Afterwards no mask data travels with the queries or the
keys, and each (query block, key block) pair a strategy computes gets one
:class:`~.masks.BlockMask`, the same object in every layer, forward and backward, whose derived
forms (bitsets, tile lists, dense pieces) are therefore made once per micro-batch.
"""

import torch
import torch.distributed as dist
from torch import Tensor

from .collectives import all_gather_rows
from .groups import rank_and_size
from .masks import BlockMask
from .shard_layout import ShardLayout


def _check_local(q_image_mask: Tensor | None, kv_image_ids: Tensor) -> None:
    """Raise ValueError naming the argument whose type or shape is wrong (this rank only)."""
    if not isinstance(kv_image_ids, Tensor) or kv_image_ids.dim() != 2:
        shape = tuple(kv_image_ids.shape) if isinstance(kv_image_ids, Tensor) else type(kv_image_ids).__name__
        raise ValueError(f"kv_image_ids must be an integer tensor [B, Skv_local], got {shape}")
    if kv_image_ids.dtype.is_floating_point or kv_image_ids.dtype == torch.bool:
        raise ValueError(f"kv_image_ids must be an integer tensor [B, Skv_local], got dtype {kv_image_ids.dtype}")
    if q_image_mask is None:
        return
    if not isinstance(q_image_mask, Tensor) or q_image_mask.dtype != torch.bool or q_image_mask.dim() != 3:
        got = f"{q_image_mask.dtype} {tuple(q_image_mask.shape)}" if isinstance(q_image_mask, Tensor) else q_image_mask
        raise ValueError(f"q_image_mask must be a bool tensor [B, Sq_local, N_ids], got {got}")
    if q_image_mask.shape[0] != kv_image_ids.shape[0]:
        raise ValueError(
            f"q_image_mask and kv_image_ids must have the same batch size, got {q_image_mask.shape[0]} "
            f"and {kv_image_ids.shape[0]}"
        )
    if q_image_mask.device != kv_image_ids.device:
        raise ValueError(
            f"q_image_mask and kv_image_ids must be on one device, got {q_image_mask.device}, {kv_image_ids.device}"
        )


_FIELDS = ("Sq_local", "Skv_local", "batch", "N_ids", "has_q_image_mask", "min id", "max id")


def _exchange(
    rows: list[int], group: dist.ProcessGroup | None, world_size: int, device: torch.device
) -> list[list[int]]:
    """Every rank's ``rows`` (one all-gather, one host synchronisation)."""
    if world_size == 1:
        return [rows]
    on = device if dist.get_backend(group) == "nccl" else torch.device("cpu")
    mine = torch.tensor(rows, dtype=torch.int64, device=on)
    table = [torch.empty_like(mine) for _ in range(world_size)]
    dist.all_gather(table, mine, group=group)
    return torch.stack(table).cpu().tolist()


class MaskPlan:
    """Every rank's image mask of one micro-batch, and a :class:`~.masks.BlockMask` per block pair.

    Use :meth:`build`. ``layout`` gives each rank's text and visual shard lengths; text and visual
    tokens are concatenated in rank order (``q_image_mask`` ``[B, sum(q_lens), N]``, ``kv_image_ids``
    ``[B, sum(kv_lens)]``).
    """

    def __init__(self, q_image_mask: Tensor | None, kv_image_ids: Tensor, layout: ShardLayout, rank: int) -> None:
        self.q_image_mask = q_image_mask
        self.kv_image_ids = kv_image_ids
        self.layout = layout
        self.rank = rank
        self._q_offsets = [0]
        for n in layout.q_lens:
            self._q_offsets.append(self._q_offsets[-1] + n)
        self._kv_offsets = [0]
        for n in layout.kv_lens:
            self._kv_offsets.append(self._kv_offsets[-1] + n)
        self._blocks: dict[tuple[int, int, int, int], BlockMask] = {}
        self.verified_calls: set[tuple] = set()  # call signatures already checked across ranks

    @property
    def batch(self) -> int:
        return self.kv_image_ids.shape[0]

    @property
    def num_ids(self) -> int:
        """Image ids per text token (0 without ``q_image_mask``)."""
        return 0 if self.q_image_mask is None else self.q_image_mask.shape[-1]

    @classmethod
    def build(
        cls,
        q_image_mask: Tensor | None,
        kv_image_ids: Tensor,
        group: dist.ProcessGroup | None = None,
        num_queries: int | None = None,
    ) -> "MaskPlan":
        """Gather every rank's mask of this micro-batch (collective over ``group``).

        Args:
            q_image_mask: ``[B, Sq_local, N_ids]`` bool, which image ids each of this rank's text
                tokens may see, or None (every text token sees every non-padding visual token).
            kv_image_ids: ``[B, Skv_local]`` int, image (or tile) id of each of this rank's visual
                tokens, ``-1`` for padding.
            group: the context-parallel group (None: the default group when distributed, else one process).
            num_queries: this rank's text length; needed only without ``q_image_mask``.

        Raises ValueError on every rank (none is left waiting) when a rank's ids are out of range or
        the batch size, number of ids or presence of ``q_image_mask`` differ between ranks.
        """
        _check_local(q_image_mask, kv_image_ids)
        if q_image_mask is not None:
            num_queries = q_image_mask.shape[1]
        elif num_queries is None or num_queries < 0:
            raise ValueError(f"num_queries (this rank's text length) is needed without q_image_mask, got {num_queries}")
        _, rank, world_size = rank_and_size(group)
        if kv_image_ids.numel():
            lo, hi = torch.aminmax(kv_image_ids)
            lo, hi = int(lo), int(hi)  # with the exchange below: the one host sync
        else:
            lo, hi = -1, -1
        n_ids = -1 if q_image_mask is None else q_image_mask.shape[-1]
        mine = [num_queries, kv_image_ids.shape[1]]
        mine += [kv_image_ids.shape[0], n_ids, int(q_image_mask is not None), lo, hi]
        table = _exchange(mine, group, world_size, kv_image_ids.device)
        for i, name in enumerate(_FIELDS[2:5], start=2):
            if len({row[i] for row in table}) > 1:
                values = {r: row[i] for r, row in enumerate(table)}
                raise ValueError(f"{name} must be the same on every rank of the group, got {values} (rank: value)")
        for r, row in enumerate(table):
            limit = row[3] if row[4] else None
            if row[5] < -1 or (limit is not None and row[6] >= limit):
                bound = f"[-1, {limit - 1}]" if limit is not None else ">= -1"
                raise ValueError(
                    f"kv_image_ids values must be in {bound} (-1 = padding), got min {row[5]}, max {row[6]} on rank {r}"
                )
        q_lens = tuple(row[0] for row in table)
        kv_lens = tuple(row[1] for row in table)
        ids = all_gather_rows(kv_image_ids.to(torch.int32), list(kv_lens), group, "plan.kv_ids")
        q_all = None
        if q_image_mask is not None:
            q_all = all_gather_rows(q_image_mask.to(torch.uint8), list(q_lens), group, "plan.q_mask").bool()
        return cls(q_all, ids, ShardLayout(q_lens, kv_lens), rank)

    def block(self, q_ranks: slice, kv_ranks: slice) -> BlockMask:
        """The mask of the text of ranks ``q_ranks`` against the visual tokens of ranks ``kv_ranks``."""
        key = (q_ranks.start, q_ranks.stop, kv_ranks.start, kv_ranks.stop)
        if key not in self._blocks:
            q0, q1 = self._q_offsets[q_ranks.start], self._q_offsets[q_ranks.stop]
            k0, k1 = self._kv_offsets[kv_ranks.start], self._kv_offsets[kv_ranks.stop]
            q_mask = None if self.q_image_mask is None else self.q_image_mask[:, q0:q1]
            self._blocks[key] = BlockMask(q_mask, self.kv_image_ids[:, k0:k1], q1 - q0)
        return self._blocks[key]
