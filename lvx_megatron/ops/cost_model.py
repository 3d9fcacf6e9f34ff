"""Predicted bytes and time of each strategy for one cross-attention call, and the choice of one.

Bytes follow the counting conventions of :mod:`.comm_stats` exactly (ring exchanges count what
they send; collectives what a ring algorithm sends per rank), so predictions can be checked
against ``count_communication``. Times combine a compute model (attention TFLOP/s as a function
of the block shape, from the block-attention benchmark) with a link model (latency + bytes /
bandwidth): ring strategies overlap each step's transfer with its compute (the next block is in
flight while the current one is computed), the all-gather strategies do not.
"""

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

STRATEGY_NAMES = ("query_ring", "kv_ring", "q_allgather", "kv_allgather")
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
    num_ids: int = 0  # image ids of the mask (0: no mask)
    has_kv_ids: bool = False

    @property
    def world_size(self) -> int:
        return len(self.q_lens)


@dataclass(frozen=True)
class Link:
    """A link between neighbouring ranks: bandwidth per direction (bytes/s) and latency (s)."""

    bandwidth: float
    latency: float = 10e-6

    def seconds(self, nbytes: float, messages: int = 1) -> float:
        return messages * self.latency + nbytes / self.bandwidth if nbytes else 0.0


@dataclass
class ComputeModel:
    """Attention throughput (FLOP/s) by query-block rows and key rows, from a measured table.

    ``table`` maps ``(sq, skv)`` to forward and forward+backward FLOP/s on a grid; other shapes
    are interpolated in log-log space (clamped to the grid). ``default`` is used when it is empty.
    """

    table: dict[tuple[int, int], tuple[float, float]] = field(default_factory=dict)
    default: tuple[float, float] = (100e12, 100e12)

    @classmethod
    def from_benchmark(cls, path: str | Path, column: str = "fused/auto", q_heads: int = 32, kv_heads: int = 8):
        """Read ``tools/bench_block_attention.py``'s JSON (TFLOP/s per shape and backend)."""
        rows = json.loads(Path(path).read_text())["results"]
        table = {}
        for row in rows:
            if row.get("variant") == column and (row["hq"], row["hkv"]) == (q_heads, kv_heads):
                table[(row["sq"], row["skv"])] = (row["fwd_tflops"] * 1e12, row["fwd_bwd_tflops"] * 1e12)
        return cls(table)

    def _rates(self, sq: int, skv: int) -> tuple[float, float]:
        """Rates at ``(sq, skv)``: bilinear in log-log space over the measured grid, clamped to it."""
        if not self.table:
            return self.default
        sqs, skvs = sorted({k[0] for k in self.table}), sorted({k[1] for k in self.table})

        def bracket(values: list[int], x: int) -> tuple[int, int, float]:
            x = min(max(x, values[0]), values[-1])
            hi = next(i for i, v in enumerate(values) if v >= x)
            lo = max(hi - 1, 0)
            if values[hi] == values[lo]:
                return values[lo], values[hi], 0.0
            return values[lo], values[hi], math.log(x / values[lo]) / math.log(values[hi] / values[lo])

        q0, q1, tq = bracket(sqs, max(sq, 1))
        k0, k1, tk = bracket(skvs, max(skv, 1))
        out = []
        for i in range(2):
            corners = [
                math.log(self.table.get(key, self.default)[i]) for key in ((q0, k0), (q1, k0), (q0, k1), (q1, k1))
            ]
            low = corners[0] * (1 - tq) + corners[1] * tq
            high = corners[2] * (1 - tq) + corners[3] * tq
            out.append(math.exp(low * (1 - tk) + high * tk))
        return out[0], out[1]

    def seconds(self, shape: CallShape, sq: int, skv: int, backward: bool) -> float:
        """Time of one block pair: ``sq`` query rows (all heads) against ``skv`` keys."""
        if sq == 0 or skv == 0:
            return 0.0
        flops = 4.0 * shape.batch * shape.q_heads * sq * skv * shape.head_dim
        fwd_rate, fwd_bwd_rate = self._rates(sq, skv)
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


def _q_bytes(s: CallShape, rows: int, width: int) -> int:
    return s.batch * rows * s.q_heads * s.head_dim * width


def _stat_bytes(s: CallShape, rows: int) -> int:
    return s.batch * rows * s.q_heads * s.acc_bytes


def _kv_bytes(s: CallShape, rows: int, width: int) -> int:
    return s.batch * rows * s.kv_heads * s.head_dim * width


def _ring_bytes(payload: list[int], carry: list[int], rank: int) -> int:
    """A ring pass: every block but the next rank's payload, and every block's carry."""
    n = len(payload)
    if n == 1:
        return 0
    return sum(p for j, p in enumerate(payload) if j != (rank + 1) % n) + sum(carry)


def predicted_bytes(strategy: str, s: CallShape, rank: int) -> tuple[int, int]:
    """``(forward, backward)`` bytes sent by ``rank`` (exactly what ``count_communication`` counts)."""
    n, e, a = s.world_size, s.elem_bytes, s.acc_bytes
    if n == 1:
        return 0, 0
    mask = [s.batch * rows * s.num_ids for rows in s.q_lens]  # uint8 visibility rows
    ids = [s.batch * rows * 8 if s.has_kv_ids else 0 for rows in s.kv_lens]
    if strategy == "query_ring":
        fwd_payload = [_q_bytes(s, rows, e) + m for rows, m in zip(s.q_lens, mask, strict=True)]
        fwd_carry = [_q_bytes(s, rows, a) + _stat_bytes(s, rows) for rows in s.q_lens]
        bwd_payload = [
            2 * _q_bytes(s, rows, e) + 2 * _stat_bytes(s, rows) + m for rows, m in zip(s.q_lens, mask, strict=True)
        ]
        bwd_carry = [_q_bytes(s, rows, a) for rows in s.q_lens]
        return _ring_bytes(fwd_payload, fwd_carry, rank), _ring_bytes(bwd_payload, bwd_carry, rank)
    if strategy == "kv_ring":
        payload = [2 * _kv_bytes(s, rows, e) + i for rows, i in zip(s.kv_lens, ids, strict=True)]
        carry = [2 * _kv_bytes(s, rows, a) for rows in s.kv_lens]
        return _ring_bytes(payload, [0] * n, rank), _ring_bytes(payload, carry, rank)
    own_q, own_kv = s.q_lens[rank], s.kv_lens[rank]
    if strategy == "q_allgather":
        gather_q = (n - 1) * (_q_bytes(s, own_q, e) + mask[rank])
        lse_all_reduce = 2 * (2 * (n - 1) * s.batch * sum(s.q_lens) * s.q_heads * a) // n
        scatter = (n - 1) * _q_bytes(s, max(s.q_lens), a)
        gather_bwd = (n - 1) * (2 * _q_bytes(s, own_q, e) + 2 * _stat_bytes(s, own_q) + mask[rank])
        return gather_q + lse_all_reduce + scatter, gather_bwd + scatter
    if strategy == "kv_allgather":
        gather = (n - 1) * (2 * _kv_bytes(s, own_kv, e) + ids[rank])
        return gather, gather + (n - 1) * 2 * _kv_bytes(s, max(s.kv_lens), a)
    raise ValueError(f"strategy must be one of {list(STRATEGY_NAMES)}, got {strategy!r}")


def predict(strategy: str, s: CallShape, link: Link, compute: ComputeModel) -> Prediction:
    """Bytes and time of ``strategy`` on the busiest rank (largest shards)."""
    n = s.world_size
    rank = max(range(n), key=lambda r: (s.q_lens[r] + s.kv_lens[r], -r))
    fwd_bytes, bwd_bytes = predicted_bytes(strategy, s, rank)
    sq, skv = max(s.q_lens), max(s.kv_lens)
    total_q, total_kv = sum(s.q_lens), sum(s.kv_lens)
    if strategy in ("query_ring", "kv_ring"):
        # n steps; each overlaps one block pair's compute with the next transfer.
        steps = lambda nbytes, backward: (
            n * max(compute.seconds(s, sq, skv, backward), link.seconds(nbytes / max(n, 1), 2 if n > 1 else 0))
        )
        fwd_s, bwd_s = steps(fwd_bytes, False), steps(bwd_bytes, True)
    elif strategy == "q_allgather":  # all queries against the local shard, collectives not overlapped
        fwd_s = compute.seconds(s, total_q, skv, False) + link.seconds(fwd_bytes, 4 * (n - 1))
        bwd_s = compute.seconds(s, total_q, skv, True) + link.seconds(bwd_bytes, 5 * (n - 1))
    else:  # kv_allgather: the local queries against every key
        fwd_s = compute.seconds(s, sq, total_kv, False) + link.seconds(fwd_bytes, 2 * (n - 1))
        bwd_s = compute.seconds(s, sq, total_kv, True) + link.seconds(bwd_bytes, 4 * (n - 1))
    return Prediction(strategy, fwd_bytes, bwd_bytes, fwd_s, bwd_s)


def choose_strategy(s: CallShape, link: Link, compute: ComputeModel) -> tuple[str, dict[str, Prediction]]:
    """The strategy with the smallest predicted forward + backward time, and every prediction."""
    predictions = {name: predict(name, s, link, compute) for name in STRATEGY_NAMES}
    # Ties (e.g. one rank) go to the query ring, the order of STRATEGY_NAMES.
    best = min(STRATEGY_NAMES, key=lambda name: (predictions[name].total_s, STRATEGY_NAMES.index(name)))
    return best, predictions


def uniform_lengths(total: int, n: int) -> tuple[int, ...]:
    """``total`` rows over ``n`` ranks, the first ones one longer (the ops' usual split)."""
    base, extra = divmod(total, n)
    return tuple(base + (1 if r < extra else 0) for r in range(n))
