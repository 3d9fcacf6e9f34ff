"""The terms the strategies' predictions of bytes and time for one cross-attention call are made of.

Bytes follow the counting conventions of :mod:`.comm_stats` exactly (ring exchanges count what
they send; collectives what a ring algorithm sends per rank), so predictions can be checked
against ``count_communication``. Times combine a compute model (attention TFLOP/s as a function
of the heads and block shape, from the block-attention benchmark's rate table) with a link model (latency + bytes /
bandwidth): ring strategies overlap each step's transfer with its compute (the next block is in
flight while the current one is computed), ``q_allgather`` overlaps its chunks' collectives with
the other chunks' compute, ``kv_allgather`` does not overlap. Given a :class:`Topology` (ranks per
node, a link inside and one between nodes) the two-level strategies are predicted too.

Each strategy's own terms live in its file and are read through :mod:`.registry`; this module
holds the shapes, links, compute model and the terms they share, below every strategy. The
choice between strategies is :mod:`.auto`'s.
"""

import math
from dataclasses import dataclass, field

from .head_chunks import head_chunk_bounds, head_chunk_count

BACKWARD_FLOPS_FACTOR = 2.5  # backward attention FLOPs / forward FLOPs


@dataclass(frozen=True)
class CallShape:
    """One distributed call: per-rank shard lengths and the attention shape."""

    q_lens: tuple[int, ...]
    kv_lens: tuple[int, ...]
    batch: int
    q_heads: int
    kv_heads: int
    head_dim: int
    elem_bytes: int = 2  # bf16
    acc_bytes: int = 4  # fp32 accumulators (8 for fp64 inputs)
    head_chunks: int | None = None  # q_allgather's requested chunks (None: by size, as the ops choose)

    @property
    def world_size(self) -> int:
        return len(self.q_lens)

    def q_allgather_chunks(self) -> list[int]:
        """Query heads of each of ``q_allgather``'s chunks (the ops' split)."""
        gathered = self.batch * sum(self.q_lens) * self.q_heads * self.head_dim * self.elem_bytes
        group = self.q_heads // self.kv_heads
        chunks = head_chunk_count(self.head_chunks, self.kv_heads, gathered)
        return [(b - a) * group for a, b in head_chunk_bounds(self.kv_heads, chunks)]


@dataclass(frozen=True)
class Link:
    """A link between neighbouring ranks: bandwidth per direction (bytes/s) and latency (s)."""

    bandwidth: float
    latency: float = 10e-6

    def seconds(self, nbytes: float, messages: int = 1) -> float:
        return messages * self.latency + nbytes / self.bandwidth if nbytes else 0.0


@dataclass(frozen=True)
class Topology:
    """Nodes of ``ranks_per_node`` consecutive ranks: the link inside a node and the one between nodes."""

    ranks_per_node: int
    inner: Link
    outer: Link

    def flat_link(self, world_size: int) -> Link:
        """The bottleneck of a ring over all ranks: the link between nodes once it crosses one."""
        return self.outer if world_size > self.ranks_per_node else self.inner


HeadConfig = tuple[int, int, int]  # (query heads, K/V heads, head dim)
Rates = tuple[float, float]  # forward and forward+backward FLOP/s


def _bracket(values: list[float], x: float) -> tuple[float, float, float]:
    """The neighbours of ``x`` in sorted ``values`` and its weight on the upper one, in log space
    (clamped to the ends)."""
    x = min(max(x, values[0]), values[-1])
    hi = next(i for i, v in enumerate(values) if v >= x)
    lo = max(hi - 1, 0)
    if values[hi] == values[lo]:
        return values[lo], values[hi], 0.0
    return values[lo], values[hi], math.log(x / values[lo]) / math.log(values[hi] / values[lo])


def _nearest(values: set[int], x: float) -> int:
    """The value closest to ``x`` in log space (ties: the larger)."""
    return min(values, key=lambda v: (abs(math.log(v / x)), -v))


@dataclass
class ComputeModel:
    """Attention throughput (FLOP/s) by head configuration and block shape, from a measured table.

    ``rates`` maps ``(q_heads, kv_heads, head_dim)`` to a complete grid ``{(sq, skv): (fwd,
    fwd_bwd)}`` (:mod:`.rate_table` reads the shipped one). A call's rates come from the rows of
    its own head configuration when they were measured; otherwise, at the nearest measured head
    dim and, among its configurations, the nearest measured ``q_heads`` (both in log space: rates
    follow no law in either that could be interpolated, tile shapes change with the head dim),
    interpolated in the GQA group size ``q_heads / kv_heads`` between the two measured groups
    around it (log rate linear in the log group size). Within a grid: bilinear in log-log space
    over ``(sq, skv)``. Everything is clamped to what was measured. ``flat``: one rate for every
    shape instead (the CPU path has no table).
    """

    rates: dict[HeadConfig, dict[tuple[int, int], Rates]] = field(default_factory=dict)
    flat: Rates | None = None

    def __post_init__(self) -> None:
        if bool(self.rates) == (self.flat is not None):
            raise ValueError("ComputeModel needs either measured rates or a flat rate, not both or neither")
        for config, grid in self.rates.items():
            sqs, skvs = {k[0] for k in grid}, {k[1] for k in grid}
            missing = [(sq, skv) for sq in sorted(sqs) for skv in sorted(skvs) if (sq, skv) not in grid]
            if missing:
                raise ValueError(f"rates of heads/head dim {config}: the (sq, skv) grid lacks {missing}")
            if any(rate <= 0 for pair in grid.values() for rate in pair):
                raise ValueError(f"rates of heads/head dim {config}: every rate must be positive")

    def rates_at(self, q_heads: int, kv_heads: int, head_dim: int, sq: int, skv: int) -> Rates:
        """Forward and forward+backward FLOP/s of ``sq`` query rows against ``skv`` keys."""
        if self.flat is not None:
            return self.flat
        dim = _nearest({c[2] for c in self.rates}, head_dim)
        hq = _nearest({c[0] for c in self.rates if c[2] == dim}, q_heads)
        by_group = {c[0] / c[1]: c for c in self.rates if c[0] == hq and c[2] == dim}
        g0, g1, tg = _bracket(sorted(by_group), q_heads / kv_heads)
        low, high = (self._grid_log_rates(self.rates[by_group[g]], sq, skv) for g in (g0, g1))
        fwd, fwd_bwd = (math.exp(a * (1 - tg) + b * tg) for a, b in zip(low, high, strict=True))
        return fwd, fwd_bwd

    @staticmethod
    def _grid_log_rates(grid: dict[tuple[int, int], Rates], sq: int, skv: int) -> list[float]:
        """Log rates at ``(sq, skv)``: bilinear in log-log space over the grid, clamped to it."""
        q0, q1, tq = _bracket(sorted({k[0] for k in grid}), max(sq, 1))
        k0, k1, tk = _bracket(sorted({k[1] for k in grid}), max(skv, 1))
        out = []
        for i in range(2):
            corners = [math.log(grid[key][i]) for key in ((q0, k0), (q1, k0), (q0, k1), (q1, k1))]
            low = corners[0] * (1 - tq) + corners[1] * tq
            high = corners[2] * (1 - tq) + corners[3] * tq
            out.append(low * (1 - tk) + high * tk)
        return out

    def seconds(self, shape: CallShape, sq: int, skv: int, backward: bool) -> float:
        """Time of one block pair: ``sq`` query rows (all heads) against ``skv`` keys."""
        if sq == 0 or skv == 0:
            return 0.0
        flops = 4.0 * shape.batch * shape.q_heads * sq * skv * shape.head_dim
        fwd_rate, fwd_bwd_rate = self.rates_at(shape.q_heads, shape.kv_heads, shape.head_dim, sq, skv)
        if not backward:
            return flops / fwd_rate
        # fwd+bwd time at the measured combined rate, minus the forward part
        return (1 + BACKWARD_FLOPS_FACTOR) * flops / fwd_bwd_rate - flops / fwd_rate


@dataclass
class Prediction:
    """Predicted bytes sent by one rank and seconds for forward and backward."""

    strategy: str
    forward_bytes: int
    backward_bytes: int
    forward_s: float
    backward_s: float

    @property
    def total_s(self) -> float:
        return self.forward_s + self.backward_s


def q_bytes(s: CallShape, rows: int, width: int) -> int:
    """Bytes of ``rows`` query-shaped rows (all heads) at ``width`` bytes per element."""
    return s.batch * rows * s.q_heads * s.head_dim * width


def stat_bytes(s: CallShape, rows: int) -> int:
    """Bytes of one per-row, per-head statistic (LSE, delta) of ``rows`` query rows."""
    return s.batch * rows * s.q_heads * s.acc_bytes


def kv_bytes(s: CallShape, rows: int, width: int) -> int:
    """Bytes of ``rows`` K- or V-shaped rows (all K/V heads) at ``width`` bytes per element."""
    return s.batch * rows * s.kv_heads * s.head_dim * width


def local_kv_bytes(s: CallShape) -> int:
    """Bytes of the largest rank's own K and V shards (one layer's, held while its attention runs)."""
    return 2 * kv_bytes(s, max(s.kv_lens), s.elem_bytes)


def ring_bytes(payload: list[int], carry: list[int], rank: int) -> int:
    """A ring pass: every block but the next rank's payload, and every block's carry."""
    n = len(payload)
    if n == 1:
        return 0
    return sum(p for j, p in enumerate(payload) if j != (rank + 1) % n) + sum(carry)


def ring_seconds(s: CallShape, link: Link, compute: ComputeModel, nbytes: tuple[int, int]) -> tuple[float, float]:
    """A ring strategy's ``(forward, backward)`` seconds: ``n`` steps, each overlapping one block
    pair's compute with the next transfer (``nbytes``: the pass's bytes sent by the rank)."""
    n = s.world_size
    sq, skv = max(s.q_lens), max(s.kv_lens)
    steps = lambda sent, backward: (
        n * max(compute.seconds(s, sq, skv, backward), link.seconds(sent / max(n, 1), 2 if n > 1 else 0))
    )
    return steps(nbytes[0], False), steps(nbytes[1], True)


def pipelined_seconds(gathers: list[float], computes: list[float], scatters: list[float]) -> float:
    """Chunks whose gather is in flight during the previous chunk's compute, and whose scatter during
    the next one's: the first gather, then per chunk the longer of its compute and the transfers
    beside it (next gather + previous scatter share the link), then the last scatter."""
    total = gathers[0] + scatters[-1]
    for c, compute in enumerate(computes):
        beside = (gathers[c + 1] if c + 1 < len(gathers) else 0.0) + (scatters[c - 1] if c else 0.0)
        total += max(compute, beside)
    return total


def predicted_plan_bytes(q_lens: tuple[int, ...], kv_lens: tuple[int, ...], batch: int, num_ids: int, rank: int) -> int:
    """Bytes ``rank`` sends building a :class:`~.mask_plan.MaskPlan` (once per micro-batch, not per
    call): its uint8 mask rows (``num_ids`` per text token; 0 without ``q_image_mask``) and int32
    image ids go to every other rank."""
    n = len(q_lens)
    return (n - 1) * batch * (q_lens[rank] * num_ids + kv_lens[rank] * 4)


def busiest_rank(s: CallShape) -> int:
    """The rank with the largest shards (the first of equals): the one whose time a call waits for."""
    return max(range(s.world_size), key=lambda r: (s.q_lens[r] + s.kv_lens[r], -r))


def uniform_lengths(total: int, n: int) -> tuple[int, ...]:
    """``total`` rows over ``n`` ranks, the first ones one longer (the ops' usual split)."""
    base, extra = divmod(total, n)
    return tuple(base + (1 if r < extra else 0) for r in range(n))
