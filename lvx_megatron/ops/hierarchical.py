"""Hierarchical strategy: ``q_allgather`` inside a node, the query ring across nodes.

Rank ``(node a, local i)`` of a :class:`~.groups.HierarchicalGroups` owns text rows ``Q_(a,i)`` and
the visual shard ``KV_(a,i)``. Forward:

1. all-gather the node's queries over the inner group: ``Q_a``;
2. query ring over the outer group (the ranks ``(b, i)`` for every node ``b``) with payload ``Q_b``
   against the local ``KV_(a,i)``: rank ``(a, i)`` ends with the partial ``(O, LSE)`` of ``Q_a``
   against column ``i`` (the shards ``KV_(b,i)`` of every node);
3. inside the node, the global LSE of the columns and a reduce-scatter of the rescaled partial
   ``O`` (fp32) to the owners, as ``q_allgather`` does over one group.

Backward mirrors it: all-gather ``Q, dO, LSE, D`` inside the node, the query ring's
backward across nodes (``dK``/``dV`` stay local, ``dQ_a`` of column ``i`` travels around the outer
ring), then a reduce-scatter of ``dQ`` inside the node.

Bytes are counted under ``inner.<name>`` (the node's collectives) and ``outer.<name>`` (the query
ring's ``payload`` and ``carry`` across nodes).
"""

import dataclasses

from torch import Tensor

from .collectives import all_gather_rows, reduce_scatter_rows
from .comm_stats import count_communication, record_bytes
from .cost_model import CallShape, ComputeModel, Topology, busiest_rank
from .groups import HierarchicalGroups
from .problem import CrossAttentionProblem, output_delta
from .q_allgather import combine_partials, q_allgather_bytes
from .query_ring import query_ring_backward, query_ring_bytes, query_ring_forward, query_ring_seconds
from .shard_layout import ShardLayout
from .strategy import Strategy


def _node_lens(p: CrossAttentionProblem, g: HierarchicalGroups) -> list[int]:
    """Text shard lengths of this rank's node (inner-group order)."""
    first = g.node * g.ranks_per_node
    return list(p.layout.q_lens[first : first + g.ranks_per_node])


def _outer_problem(p: CrossAttentionProblem, g: HierarchicalGroups) -> CrossAttentionProblem:
    """The query ring's problem across nodes: block ``b`` = node ``b``'s queries and ``KV_(b, i)``."""
    L, i = g.ranks_per_node, g.local_rank
    q_lens = tuple(sum(p.layout.q_lens[b * L : (b + 1) * L]) for b in range(g.num_nodes))
    kv_lens = tuple(p.layout.kv_lens[b * L + i] for b in range(g.num_nodes))
    return dataclasses.replace(
        p,
        group=g.outer,
        rank=g.node,
        layout=ShardLayout(q_lens, kv_lens),
        q_blocks=tuple(slice(b * L, (b + 1) * L) for b in range(g.num_nodes)),
        kv_blocks=tuple(slice(b * L + i, b * L + i + 1) for b in range(g.num_nodes)),
    )


def _counted_as(prefix: str, stats) -> None:
    """Re-record the bytes of a nested counter under ``prefix.<name>`` in the enclosing one."""
    first = True
    for name, nbytes in stats.by_name.items():
        record_bytes(f"{prefix}.{name}", nbytes, messages=stats.messages if first else 0)
        first = False


def hierarchical_forward(
    q: Tensor, k: Tensor, v: Tensor, p: CrossAttentionProblem, *, groups: HierarchicalGroups
) -> tuple[Tensor, Tensor]:
    """Return this rank's ``(out, lse)`` (``p`` describes the flat, node-major parent group)."""
    g, acc, local = groups, p.acc_dtype, groups.local_rank
    lens = _node_lens(p, g)
    q_node = all_gather_rows(q, lens, g.inner, "inner.q")
    with count_communication() as ring_stats:
        o, lse = query_ring_forward(q_node, k, v, _outer_problem(p, g))
    _counted_as("outer", ring_stats)
    o_own, lse_own = combine_partials(o, lse, lens, local, g.inner, acc, prefix="inner.")
    return o_own.to(q.dtype), lse_own


def hierarchical_backward(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    p: CrossAttentionProblem,
    *,
    groups: HierarchicalGroups,
) -> tuple[Tensor, Tensor, Tensor]:
    """Return ``(dq, dk, dv)``."""
    g, acc, local = groups, p.acc_dtype, groups.local_rank
    lens = _node_lens(p, g)
    gather = lambda t, name: all_gather_rows(t, lens, g.inner, f"inner.{name}")
    q_node, do_node = gather(q, "q"), gather(dout.to(q.dtype), "dout")
    lse_node, delta_node = gather(lse, "lse"), gather(output_delta(dout, out), "delta")
    with count_communication() as ring_stats:
        dq_node, dk, dv = query_ring_backward(
            do_node, q_node, k, v, None, lse_node, _outer_problem(p, g), delta=delta_node
        )
    _counted_as("outer", ring_stats)
    dq = reduce_scatter_rows(dq_node.to(acc), lens, local, g.inner, "inner.dq")
    return dq.to(q.dtype), dk, dv


def _node_shape(s: CallShape, node: int, ranks_per_node: int) -> CallShape:
    """One node's ranks as a group: the inner level (an unchunked ``q_allgather``)."""
    rows = slice(node * ranks_per_node, (node + 1) * ranks_per_node)
    return dataclasses.replace(s, q_lens=s.q_lens[rows], kv_lens=s.kv_lens[rows], head_chunks=1)


def _column_shape(s: CallShape, local: int, ranks_per_node: int) -> CallShape:
    """The outer level: a query ring over the nodes with node-sized query blocks against the shards
    of local index ``local``."""
    nodes = s.world_size // ranks_per_node
    q_lens = tuple(sum(s.q_lens[b * ranks_per_node : (b + 1) * ranks_per_node]) for b in range(nodes))
    kv_lens = tuple(s.kv_lens[b * ranks_per_node + local] for b in range(nodes))
    return dataclasses.replace(s, q_lens=q_lens, kv_lens=kv_lens)


def _check_ranks_per_node(s: CallShape, ranks_per_node: int | None) -> int:
    if ranks_per_node is None or ranks_per_node < 1 or s.world_size % ranks_per_node:
        raise ValueError(
            f"strategy 'hierarchical' needs ranks_per_node, a positive divisor of the world size "
            f"({s.world_size}), got {ranks_per_node!r}"
        )
    return ranks_per_node


def predicted_level_bytes(s: CallShape, rank: int, ranks_per_node: int) -> dict[str, tuple[int, int]]:
    """``{"inner": (fwd, bwd), "outer": (fwd, bwd)}`` bytes sent by ``rank``.

    Exactly what ``count_communication`` counts under ``inner.*`` and ``outer.*``.
    """
    node, local = divmod(rank, _check_ranks_per_node(s, ranks_per_node))
    inner, outer = _node_shape(s, node, ranks_per_node), _column_shape(s, local, ranks_per_node)
    return {
        "inner": q_allgather_bytes(inner, local) if inner.world_size > 1 else (0, 0),
        "outer": query_ring_bytes(outer, node) if outer.world_size > 1 else (0, 0),
    }


def hierarchical_bytes(s: CallShape, rank: int, ranks_per_node: int | None) -> tuple[int, int]:
    """``(forward, backward)`` bytes ``rank`` sends over both levels."""
    levels = predicted_level_bytes(s, rank, ranks_per_node)
    return levels["inner"][0] + levels["outer"][0], levels["inner"][1] + levels["outer"][1]


def hierarchical_seconds(
    s: CallShape, link: Topology, compute: ComputeModel, rank: int, nbytes: tuple[int, int]
) -> tuple[float, float]:
    """``(forward, backward)`` seconds: the node's collectives (not overlapped) around a query ring
    of node-sized blocks across nodes."""
    per_node = link.ranks_per_node
    levels = predicted_level_bytes(s, rank, per_node)
    column = _column_shape(s, rank % per_node, per_node)
    ring_rank = busiest_rank(column)
    ring_bytes = query_ring_bytes(column, ring_rank) if column.world_size > 1 else (0, 0)
    ring_fwd, ring_bwd = query_ring_seconds(column, link.outer, compute, ring_rank, ring_bytes)
    fwd_s = link.inner.seconds(levels["inner"][0], 4 * (per_node - 1)) + ring_fwd
    bwd_s = link.inner.seconds(levels["inner"][1], 5 * (per_node - 1)) + ring_bwd
    return fwd_s, bwd_s


STRATEGY = Strategy(
    "hierarchical",
    hierarchical_forward,
    hierarchical_backward,
    hierarchical_bytes,
    hierarchical_seconds,
    two_level=True,
)
