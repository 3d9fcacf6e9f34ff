"""Query all-gather: every rank attends all text queries to its local visual shard.

Forward: all-gather ``Q``, partial ``(O, LSE)`` of all queries against the local
K/V, the global LSE from two small all-reduces (max, then sum of ``exp``), each partial ``O``
rescaled by ``exp(LSE_local - LSE_global)`` and reduce-scattered back to the owners.
Backward: all-gather ``Q, dO, LSE, D``, local ``dQ_all, dK, dV`` with the global
statistics, reduce-scatter of ``dQ``. Same volume as the query ring in a few collectives.

Heads are independent, so both passes run in ``p.head_chunks`` chunks of whole K/V-head groups
(GQA packing stays valid): the all-gather of chunk ``c + 1`` is in flight while chunk ``c``
computes, and the reduce-scatter of chunk ``c`` while the next chunks compute. Only the small
LSE all-reduces wait. One chunk is the plain, unpipelined algorithm. The mask rows never travel:
every rank's plan holds them.
"""

from collections.abc import Callable

import torch
from torch import Tensor

from .collectives import Pending, all_reduce_lse, post_all_gather_rows, post_reduce_scatter_rows
from .cost_model import CallShape, ComputeModel, Link, pipelined_seconds, q_bytes, stat_bytes
from .head_chunks import head_chunk_bounds
from .merge import safe_lse
from .problem import ALL, CrossAttentionProblem, output_delta
from .strategy import Strategy


def post_combine_partials(
    o: Tensor, lse: Tensor, lens: list[int], rank: int, group, acc: torch.dtype, prefix: str = ""
) -> Pending:
    """Merge every rank's partial ``(O, LSE)`` of the same gathered queries; keep this rank's rows.

    The global LSE comes from two small all-reduces (done before returning); each partial ``O`` is
    rescaled by ``exp(LSE_local - LSE_global)`` and the sum's reduce-scatter to the rows' owners
    is posted. ``wait()`` returns ``(O, LSE)`` of this rank's rows in ``acc``; bytes are counted as
    ``<prefix>lse``, ``<prefix>o``.
    """
    lse = lse.to(acc)
    lse_global = all_reduce_lse(lse, group, len(lens), f"{prefix}lse")
    weight = torch.exp(lse - safe_lse(lse_global)).unsqueeze(-1)
    o_own = post_reduce_scatter_rows(o.to(acc) * weight, lens, rank, group, f"{prefix}o")
    start = sum(lens[:rank])
    lse_own = lse_global[:, start : start + lens[rank]].contiguous()
    return Pending(None, lambda: (o_own.wait(), lse_own))


def combine_partials(
    o: Tensor, lse: Tensor, lens: list[int], rank: int, group, acc: torch.dtype, prefix: str = ""
) -> tuple[Tensor, Tensor]:
    """:func:`post_combine_partials`, completed."""
    return post_combine_partials(o, lse, lens, rank, group, acc, prefix).wait()


def _head_slices(p: CrossAttentionProblem) -> list[tuple[slice, slice]]:
    """``(query heads, K/V heads)`` of each chunk."""
    g = p.q_heads // p.kv_heads
    return [(slice(a * g, b * g), slice(a, b)) for a, b in head_chunk_bounds(p.kv_heads, p.head_chunks)]


def _pipeline(
    num_chunks: int, post_inputs: Callable[[int], list[Pending]], work: Callable[[int, list[Tensor]], Pending]
) -> list:
    """``work(c, inputs_c)`` for every chunk, with chunk ``c + 1``'s inputs in flight meanwhile.

    ``post_inputs(c)`` posts chunk ``c``'s all-gathers; ``work`` computes and posts the chunk's
    reduce-scatter, which completes while later chunks compute. Returns every chunk's result.
    """
    incoming = post_inputs(0)
    outgoing = []
    for c in range(num_chunks):
        inputs = [pending.wait() for pending in incoming]
        if c + 1 < num_chunks:
            incoming = post_inputs(c + 1)
        outgoing.append(work(c, inputs))
    return [pending.wait() for pending in outgoing]


def _cat_heads(parts: list[Tensor]) -> Tensor:
    """Concatenate per-chunk results along the head dim (one chunk: no copy)."""
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)


def q_allgather_forward(q: Tensor, k: Tensor, v: Tensor, p: CrossAttentionProblem) -> tuple[Tensor, Tensor]:
    """Return this rank's ``(out, lse)``."""
    lens, acc, rank, slices = list(p.layout.q_lens), p.acc_dtype, p.rank, _head_slices(p)
    mask = p.mask(ALL, p.rank)

    def post_inputs(c: int) -> list[Pending]:
        return [post_all_gather_rows(q[:, :, slices[c][0]], lens, p.group, "q")]

    def work(c: int, inputs: list[Tensor]) -> Pending:
        kv_heads = slices[c][1]
        o, lse = p.backend.forward(inputs[0], k[:, :, kv_heads], v[:, :, kv_heads], mask, p.scale)
        return post_combine_partials(o, lse, lens, rank, p.group, acc)

    parts = _pipeline(len(slices), post_inputs, work)
    return _cat_heads([o for o, _ in parts]).to(q.dtype), _cat_heads([lse for _, lse in parts])


def q_allgather_backward(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, p: CrossAttentionProblem
) -> tuple[Tensor, Tensor, Tensor]:
    """Return ``(dq, dk, dv)``."""
    lens, acc, rank, slices = list(p.layout.q_lens), p.acc_dtype, p.rank, _head_slices(p)
    mask = p.mask(ALL, p.rank)
    travelling = (("q", q), ("dout", dout.to(q.dtype)), ("lse", lse), ("delta", output_delta(dout, out)))
    dkv: list[tuple[Tensor, Tensor]] = []

    def post_inputs(c: int) -> list[Pending]:
        heads = slices[c][0]
        return [post_all_gather_rows(t[:, :, heads], lens, p.group, name) for name, t in travelling]

    def work(c: int, inputs: list[Tensor]) -> Pending:
        q_all, do_all, lse_all, delta_all = inputs
        kv_heads = slices[c][1]
        dq_all, dk, dv = p.backend.backward(
            do_all, q_all, k[:, :, kv_heads], v[:, :, kv_heads], lse_all, delta_all, mask, p.scale
        )
        dkv.append((dk, dv))
        return post_reduce_scatter_rows(dq_all.to(acc), lens, rank, p.group, "dq")

    dq = _cat_heads(_pipeline(len(slices), post_inputs, work))
    dk, dv = (_cat_heads([part[i] for part in dkv]) for i in range(2))
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def q_allgather_bytes(s: CallShape, rank: int, ranks_per_node: int | None = None) -> tuple[int, int]:
    """``(forward, backward)`` bytes ``rank`` sends: its queries (backward also ``dO``, LSE, delta) to
    every rank, the LSE all-reduces of every head chunk, the reduce-scatter of ``O`` / ``dQ``."""
    n, e, a = s.world_size, s.elem_bytes, s.acc_bytes
    own_q = s.q_lens[rank]
    gather_q = (n - 1) * q_bytes(s, own_q, e)
    # One LSE all-reduce per head chunk, each counted with integer division.
    lse_all_reduce = sum(
        2 * (2 * (n - 1) * s.batch * sum(s.q_lens) * heads * a) // n for heads in s.q_allgather_chunks()
    )
    scatter = (n - 1) * q_bytes(s, max(s.q_lens), a)
    gather_bwd = (n - 1) * (2 * q_bytes(s, own_q, e) + 2 * stat_bytes(s, own_q))
    return gather_q + lse_all_reduce + scatter, gather_bwd + scatter


def q_allgather_seconds(
    s: CallShape, link: Link, compute: ComputeModel, rank: int, nbytes: tuple[int, int]
) -> tuple[float, float]:
    """``(forward, backward)`` seconds: all queries against the local shard, chunks pipelined."""
    n, e, a = s.world_size, s.elem_bytes, s.acc_bytes
    own_q, total_q, skv = s.q_lens[rank], sum(s.q_lens), max(s.kv_lens)
    msgs = n - 1  # ring steps of one collective
    times = []
    for backward in (False, True):
        gathers, computes, scatters = [], [], []
        for heads in s.q_allgather_chunks():
            part = heads / s.q_heads
            travelling = (2 * q_bytes(s, own_q, e) + 2 * stat_bytes(s, own_q)) if backward else q_bytes(s, own_q, e)
            gathered = (n - 1) * part * travelling
            gathers.append(link.seconds(gathered, (4 if backward else 1) * msgs))
            work = part * compute.seconds(s, total_q, skv, backward)
            if not backward:  # the LSE all-reduces wait: they are not overlapped
                work += link.seconds(2 * (2 * (n - 1) * s.batch * total_q * heads * a) / n, 2 * msgs)
            computes.append(work)
            scatters.append(link.seconds((n - 1) * part * q_bytes(s, max(s.q_lens), a), msgs))
        times.append(pipelined_seconds(gathers, computes, scatters))
    return times[0], times[1]


STRATEGY = Strategy("q_allgather", q_allgather_forward, q_allgather_backward, q_allgather_bytes, q_allgather_seconds)
