"""``strategy="auto"``: the cost model's prediction of every registered strategy for one call, from its
shapes and the group's links, and the choice of the fastest."""

import torch
import torch.distributed as dist
from torch import Tensor

from .cost_model import CallShape, ComputeModel, Link, Prediction, Topology, busiest_rank
from .groups import HierarchicalGroups
from .mask_plan import MaskPlan
from .prepare import CallOptions, prepare_call
from .problem import CrossAttentionProblem
from .rate_table import compute_model, load_rate_table
from .registry import REGISTRY
from .strategy import Strategy

# The CPU path has no table: one core's fp32 attention rate (forward, forward+backward FLOP/s),
# the same for every block shape.
CPU_RATE = (20e9, 15e9)
# Links by process-group backend: NCCL inside a node (NVLink) and gloo over TCP.
DEFAULT_LINKS = {"nccl": Link(bandwidth=100e9, latency=10e-6), "gloo": Link(bandwidth=1e9, latency=50e-6)}


def _registered(strategy: str) -> Strategy:
    """The registered :class:`~.strategy.Strategy` named ``strategy``, or a ValueError listing the names."""
    if strategy not in REGISTRY:
        raise ValueError(f"strategy must be one of {list(REGISTRY)}, got {strategy!r}")
    return REGISTRY[strategy]


def predicted_bytes(strategy: str, s: CallShape, rank: int, ranks_per_node: int | None = None) -> tuple[int, int]:
    """``(forward, backward)`` bytes sent by ``rank`` (exactly what ``count_communication`` counts).

    ``ranks_per_node`` is needed by the two-level strategies only.
    """
    spec = _registered(strategy)
    if not spec.two_level and s.world_size == 1:
        return 0, 0
    return spec.predicted_bytes(s, rank, ranks_per_node)


def predict(strategy: str, s: CallShape, link: Link | Topology, compute: ComputeModel) -> Prediction:
    """Bytes and time of ``strategy`` on the busiest rank (largest shards).

    ``link``: one link for every hop, or a :class:`~.cost_model.Topology` (strategies over all ranks then run
    at its :meth:`~.cost_model.Topology.flat_link`; the two-level strategies need one).
    """
    spec = _registered(strategy)
    rank = busiest_rank(s)
    if spec.two_level:
        if not isinstance(link, Topology):
            raise ValueError(f"strategy {strategy!r} needs link=Topology(ranks_per_node, inner, outer)")
        nbytes = predicted_bytes(strategy, s, rank, link.ranks_per_node)
    else:
        if isinstance(link, Topology):
            link = link.flat_link(s.world_size)
        nbytes = predicted_bytes(strategy, s, rank)
    fwd_s, bwd_s = spec.predicted_seconds(s, link, compute, rank, nbytes)
    return Prediction(strategy, nbytes[0], nbytes[1], fwd_s, bwd_s)


def choose_strategy(s: CallShape, link: Link | Topology, compute: ComputeModel) -> tuple[str, dict[str, Prediction]]:
    """The strategy with the smallest predicted forward + backward time, and every prediction.

    With a :class:`~.cost_model.Topology` whose ``ranks_per_node`` divides the world size, the two-level
    strategies are candidates too.
    """
    two_level = isinstance(link, Topology) and s.world_size % link.ranks_per_node == 0
    names = [name for name, spec in REGISTRY.items() if two_level or not spec.two_level]
    predictions = {name: predict(name, s, link, compute) for name in names}
    # Ties (e.g. one rank) go to the first registered (the query ring).
    best = min(names, key=lambda name: (predictions[name].total_s, names.index(name)))
    return best, predictions


def default_compute_model(device: torch.device, masked: bool) -> ComputeModel:
    """On a GPU the shipped rate table's rows (``"image"`` for masked calls, else ``"none"``); it
    refuses to guess without them (:class:`~.rate_table.RateTableError` naming the file). On CPU
    the flat :data:`CPU_RATE`."""
    if device.type == "cpu":
        return ComputeModel(flat=CPU_RATE)
    return compute_model(load_rate_table(), "image" if masked else "none")


def default_link(group: dist.ProcessGroup | None) -> Link:
    """The link :data:`DEFAULT_LINKS` assumes for ``group``'s backend (gloo when not distributed)."""
    backend = dist.get_backend(group) if dist.is_available() and dist.is_initialized() else "gloo"
    return DEFAULT_LINKS.get(str(backend), DEFAULT_LINKS["gloo"])


def choose_for_problem(
    p: CrossAttentionProblem, elem_bytes: int, device: torch.device, link: Link | Topology | None = None
) -> tuple[str, dict[str, Prediction]]:
    """The fastest predicted strategy for a prepared call (its global shapes, the same on every
    rank), and every prediction. ``link`` None: :func:`default_link` of the call's group."""
    shape = CallShape(
        q_lens=tuple(p.layout.q_lens),
        kv_lens=tuple(p.layout.kv_lens),
        batch=p.batch,
        q_heads=p.q_heads,
        kv_heads=p.kv_heads,
        head_dim=p.head_dim,
        elem_bytes=elem_bytes,
        acc_bytes=torch.empty((), dtype=p.acc_dtype).element_size(),
        head_chunks=p.head_chunks,
    )
    return choose_strategy(shape, link or default_link(p.group), default_compute_model(device, p.plan is not None))


def choose_for_call(
    q: Tensor,
    kv_shape: tuple[int, int, int, int],
    *,
    group: dist.ProcessGroup | HierarchicalGroups | None = None,
    mask_plan: MaskPlan | None = None,
    link: Link | Topology | None = None,
    head_chunks: int | None = None,
) -> tuple[str, dict[str, Prediction]]:
    """The fastest predicted strategy for a call with these queries and K/V shape (collective).

    Every rank of ``group`` must call it; they exchange shard lengths and reach the same choice.
    ``link``: the group's link (None: by backend), or a :class:`~.cost_model.Topology`, which
    makes ``"hierarchical"`` a candidate. ``head_chunks`` as in ``distributed_cross_attention``.
    """
    k = q.new_empty(()).expand(kv_shape)  # only the shape travels
    p = prepare_call(q, k, k, CallOptions(group, mask_plan=mask_plan, head_chunks=head_chunks))
    return choose_for_problem(p, q.element_size(), q.device, link)
