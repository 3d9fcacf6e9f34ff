"""Llama-3.2-Vision cross-attention masks in their compact form, and what kernels derive from it.

Every visual token carries the id of its image (or image tile); ``-1`` marks padding, which no
text token ever attends. Every text token carries one boolean per id saying whether it may see
that image. A :class:`BlockMask` is that pair for one (query block, key block) of a distributed
call. Backends never get a dense ``[B, Sq, Skv]`` mask; they read the forms a BlockMask derives
on first use and keeps (a :class:`~.mask_plan.MaskPlan` hands the same BlockMask to every layer
of a micro-batch, forward and backward, so each form is made once per micro-batch):

- :meth:`BlockMask.image_bits` / :meth:`BlockMask.key_ids`: the kernels' int32 inputs;
- :meth:`BlockMask.tiles`: the (query tile, key tile) classification as index lists (full tiles
  need no mask work, partial ones apply the per-row bits, empty ones are never visited);
- :meth:`BlockMask.dense_runs`: the mask as a few row runs, each seeing a set of key ranges in
  full: gathered, each is one dense block for kernels that take no mask at all.
"""

from dataclasses import dataclass, field

import torch
from torch import Tensor

TILE_EMPTY, TILE_PARTIAL, TILE_FULL = 0, 1, 2

# A run of text rows (first, end) and the key ranges ((first, end), ...) every one of them sees in full.
DenseRun = tuple[int, int, tuple[tuple[int, int], ...]]


def block_mask(q_image_mask: Tensor | None, kv_image_ids: Tensor, num_queries: int) -> Tensor:
    """Dense ``[B, Sq, Skv]`` boolean mask (True = attend) of one query block and one key block.

    ``q_image_mask`` ``[B, Sq, N_ids]`` (None: every text token sees every non-padding visual
    token) and ``kv_image_ids`` ``[B, Skv]`` (``-1`` for padding); ``num_queries`` is ``Sq``.
    """
    valid = kv_image_ids >= 0
    if q_image_mask is None:
        return valid.unsqueeze(1).expand(-1, num_queries, -1)
    index = kv_image_ids.clamp(min=0).unsqueeze(1).expand(-1, q_image_mask.shape[1], -1)
    return torch.gather(q_image_mask.bool(), 2, index) & valid.unsqueeze(1)


def pack_image_bits(q_image_mask: Tensor) -> Tensor:
    """``[B, Sq, N]`` bool -> ``[B, Sq, ceil(N / 32)]`` int32 bitsets (bit ``i % 32`` of word ``i // 32``)."""
    b, sq, n = q_image_mask.shape
    words = max(-(-n // 32), 1)
    padded = q_image_mask.new_zeros(b, sq, words * 32)
    padded[..., :n] = q_image_mask
    weights = torch.ones(32, dtype=torch.int64, device=q_image_mask.device) << torch.arange(
        32, device=q_image_mask.device
    )
    packed = (padded.view(b, sq, words, 32).to(torch.int64) * weights).sum(-1)
    return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)


@dataclass(frozen=True)
class TileLists:
    """For each tile of the walking side, the tiles of the other side it meets.

    Full tiles come as runs of consecutive tiles, so kernels walk them with the plain unmasked
    loop: run ``j < run_count[b, t]`` covers tiles ``run_start[b, t, j] ..`` (``run_length`` of
    them) at positions ``run_position[b, t, j] ..`` of the ``full_count[b, t]`` full tiles
    (split-KV programs take shares of those positions). Partial tiles are listed one by one,
    ``partial_index[b, t, :partial_count[b, t]]``. Empty tiles are in neither. All int32, ascending,
    on the mask's device.
    """

    full_count: Tensor  # [B, T]
    run_count: Tensor  # [B, T]
    run_start: Tensor  # [B, T, U]
    run_length: Tensor  # [B, T, U]
    run_position: Tensor  # [B, T, U]
    partial_count: Tensor  # [B, T]
    partial_index: Tensor  # [B, T, U]

    def full_tiles(self, b: int, t: int) -> list[int]:
        """The full tiles of tile ``t`` of sample ``b``, expanded from the runs (host; for tests)."""
        runs = range(int(self.run_count[b, t]))
        return [int(self.run_start[b, t, j]) + i for j in runs for i in range(int(self.run_length[b, t, j]))]


def _index_lists(selected: Tensor) -> tuple[Tensor, Tensor]:
    """``[B, T, U]`` bool -> ``(count [B, T], index [B, T, U])``: the selected columns of each row, ascending."""
    b, t, u = selected.shape
    count = selected.sum(-1, dtype=torch.int32)
    position = torch.where(selected, selected.cumsum(-1) - 1, u)  # unselected columns land in a spare slot
    index = torch.zeros(b, t, u + 1, dtype=torch.int32, device=selected.device)
    columns = torch.arange(u, dtype=torch.int32, device=selected.device).expand(b, t, u)
    index.scatter_(-1, position, columns)
    return count, index[..., :u].contiguous()


def _tile_lists(kind: Tensor) -> TileLists:
    """:class:`TileLists` of a ``[B, T, U]`` classification (walking side first)."""
    full = kind == TILE_FULL
    before = torch.nn.functional.pad(full[..., :-1], (1, 0))
    after = torch.nn.functional.pad(full[..., 1:], (0, 1))
    run_count, run_start = _index_lists(full & ~before)
    _, run_end = _index_lists(full & ~after)
    run_length = run_end - run_start + 1
    run_position = (run_length.cumsum(-1) - run_length).to(torch.int32)
    partial_count, partial_index = _index_lists(kind == TILE_PARTIAL)
    full_count = full.sum(-1, dtype=torch.int32)
    return TileLists(full_count, run_count, run_start, run_length, run_position, partial_count, partial_index)


def classify_tiles(
    q_image_mask: Tensor | None, kv_image_ids: Tensor, num_queries: int, group: int, block_m: int, block_n: int
) -> Tensor:
    """``[B, R, C]`` int8 kind (:data:`TILE_EMPTY`, :data:`TILE_PARTIAL`, :data:`TILE_FULL`) of every
    (row tile, key tile) pair, without building the dense mask.

    Rows are packed as the kernels pack them: packed row ``r`` is text token ``r // group``; a row
    tile is ``block_m`` packed rows, a key tile ``block_n`` keys. A pair is full when every token of
    the row tile sees every key of the key tile (no padding, every id visible), empty when no
    token sees any of its keys.
    """
    b, skv = kv_image_ids.shape
    device = kv_image_ids.device
    rows = num_queries * group
    r_tiles, c_tiles = -(-rows // block_m), -(-skv // block_n)
    # Per key tile, which slots occur: 0 padding, 1 + id (any valid id without q_image_mask), and a
    # last slot for the positions past the end of the block.
    num_ids = 1 if q_image_mask is None else q_image_mask.shape[-1]
    ids = kv_image_ids.to(torch.int64) if q_image_mask is not None else (kv_image_ids >= 0).to(torch.int64) - 1
    slots = torch.full((b, c_tiles * block_n), num_ids + 1, dtype=torch.int64, device=device)
    slots[:, :skv] = torch.where(ids < 0, 0, ids + 1)
    present = torch.zeros(b, c_tiles, num_ids + 2, dtype=torch.float32, device=device)
    present.scatter_(2, slots.view(b, c_tiles, block_n), 1.0)
    padding, present = present[..., 0] > 0, present[..., 1 : num_ids + 1]
    if q_image_mask is None:
        seen = (present[..., 0] > 0).unsqueeze(1).expand(b, r_tiles, c_tiles)
        full = seen & ~padding.unsqueeze(1)
    else:
        first = torch.arange(r_tiles, device=device) * block_m // group
        last = torch.clamp(((torch.arange(r_tiles, device=device) + 1) * block_m - 1) // group, max=num_queries - 1)
        counts = torch.zeros(b, num_queries + 1, num_ids, dtype=torch.int32, device=device)
        counts[:, 1:] = q_image_mask.to(torch.int32).cumsum(1)
        visible = counts[:, last + 1] - counts[:, first]  # [B, R, N]: tokens of the tile that see each id
        tokens = (last - first + 1).view(1, -1, 1)
        seen = torch.bmm((visible > 0).float(), present.transpose(1, 2)) > 0
        hidden_somewhere = torch.bmm((visible < tokens).float(), present.transpose(1, 2)) > 0
        full = seen & ~hidden_somewhere & ~padding.unsqueeze(1)
    kind = torch.full((b, r_tiles, c_tiles), TILE_EMPTY, dtype=torch.int8, device=device)
    kind[seen] = TILE_PARTIAL
    kind[full] = TILE_FULL
    return kind


def _true_ranges(flags: list[bool], starts: list[int], ends: list[int]) -> list[tuple[int, int]]:
    """Merge the runs whose flag is set into maximal contiguous ``(start, end)`` key ranges."""
    ranges: list[tuple[int, int]] = []
    for flag, start, end in zip(flags, starts, ends, strict=True):
        if not flag:
            continue
        if ranges and ranges[-1][1] == start:
            ranges[-1] = (ranges[-1][0], end)
        else:
            ranges.append((start, end))
    return ranges


def sample_dense_runs(q_image_mask: Tensor | None, kv_image_ids: Tensor, num_queries: int) -> list[DenseRun]:
    """One sample's mask (CPU tensors ``[Sq, N]``, ``[Skv]``) as row runs and the key ranges they see.

    Text tokens with identical mask rows form row runs, visual tokens of one id key runs; each row
    run sees a set of key ranges (visible runs merged). Neighbouring row runs that see the same
    ranges are merged, and runs that see nothing are left out (their rows see no key).
    """
    if num_queries == 0 or kv_image_ids.numel() == 0 or (q_image_mask is not None and q_image_mask.shape[-1] == 0):
        return []
    ids, id_counts = torch.unique_consecutive(kv_image_ids, return_counts=True)
    ends = id_counts.cumsum(0)
    starts, ends = (ends - id_counts).tolist(), ends.tolist()
    valid = ids >= 0
    if q_image_mask is None:
        row_runs = [(0, num_queries, valid.tolist())]
    else:
        patterns, row_counts = torch.unique_consecutive(q_image_mask.to(torch.uint8), dim=0, return_counts=True)
        row_ends = row_counts.cumsum(0).tolist()
        visible = (patterns.bool()[:, ids.clamp(min=0)] & valid).tolist()
        counts = row_counts.tolist()
        row_runs = [(end - n, end, flags) for end, n, flags in zip(row_ends, counts, visible, strict=True)]
    runs: list[DenseRun] = []
    for first, end, flags in row_runs:
        ranges = tuple(_true_ranges(flags, starts, ends))
        if runs and runs[-1][1] == first and runs[-1][2] == ranges:
            first = runs.pop()[0]
        runs.append((first, end, ranges))
    return [run for run in runs if run[2]]


@dataclass(frozen=True)
class BlockMask:
    """The compact mask of one (query block, key block) pair, as the strategies hand it to a backend."""

    q_image_mask: Tensor | None  # [B, Sq, N_ids] bool, or None: every row sees every valid id
    kv_image_ids: Tensor  # [B, Skv] integer ids, -1 for padding
    num_queries: int
    _derived: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def _once(self, key: tuple, make):
        if key not in self._derived:
            self._derived[key] = make()
        return self._derived[key]

    def dense(self) -> Tensor:
        """The dense ``[B, Sq, Skv]`` boolean mask (True = attend); for reference backends and tests."""
        return block_mask(self.q_image_mask, self.kv_image_ids, self.num_queries)

    def image_bits(self) -> Tensor:
        """``[B, Sq, W]`` int32 bitsets of the visible ids (needs ``q_image_mask``)."""
        return self._once(("bits",), lambda: pack_image_bits(self.q_image_mask.bool()))

    def key_ids(self) -> Tensor:
        """``[B, Skv]`` contiguous int32 ids."""
        return self._once(("ids",), lambda: self.kv_image_ids.to(torch.int32).contiguous())

    def tiles(self, group: int, block_m: int, block_n: int, by_keys: bool = False) -> TileLists:
        """Index lists of the tile classification (:func:`classify_tiles`), per row tile or, with
        ``by_keys``, per key tile (for kernels that walk the row tiles of one key tile)."""

        def make() -> TileLists:
            kind = self._kinds(group, block_m, block_n)
            return _tile_lists(kind.transpose(1, 2) if by_keys else kind)

        return self._once(("tiles", group, block_m, block_n, by_keys), make)

    def _kinds(self, group: int, block_m: int, block_n: int) -> Tensor:
        """:func:`classify_tiles` of this block for one tiling, made once."""
        return self._once(
            ("kind", group, block_m, block_n),
            lambda: classify_tiles(self.q_image_mask, self.kv_image_ids, self.num_queries, group, block_m, block_n),
        )

    def has_partial_tiles(self, group: int, block_m: int, block_n: int) -> bool:
        """Whether any tile of this tiling is partial (one host synchronisation, once per tiling)."""
        return self._once(
            ("has_partial", group, block_m, block_n),
            lambda: bool((self._kinds(group, block_m, block_n) == TILE_PARTIAL).any()),
        )

    def dense_runs(self) -> list[list[DenseRun]]:
        """Per sample, the row runs and the key ranges they see (:func:`sample_dense_runs`); one
        host copy of the mask (a synchronisation, once per BlockMask)."""

        def make() -> list[list[DenseRun]]:
            ids = self.kv_image_ids.cpu()
            q_mask = None if self.q_image_mask is None else self.q_image_mask.cpu()
            return [
                sample_dense_runs(None if q_mask is None else q_mask[i], ids[i], self.num_queries)
                for i in range(ids.shape[0])
            ]

        return self._once(("dense_runs",), make)

    def run_keys(self, sample: int, run: int) -> Tensor:
        """The key indices of dense run ``run`` of ``sample`` (int64, on the mask's device)."""

        def make() -> Tensor:
            keys = self.dense_runs()[sample][run][2]
            index = torch.cat([torch.arange(lo, hi) for lo, hi in keys])
            return index.to(self.kv_image_ids.device)

        return self._once(("run_keys", sample, run), make)

    def is_full(self) -> bool:
        """Whether every text token sees every visual token (the block needs no mask at all)."""
        whole = [(0, self.num_queries, ((0, self.kv_image_ids.shape[1]),))]
        return all(runs == whole for runs in self.dense_runs())


# What a backend is given for a block: its mask, or None when every query sees every key.
type MaskOrAll = BlockMask | None
