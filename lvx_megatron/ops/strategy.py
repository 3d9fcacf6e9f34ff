"""What a distributed strategy declares: its passes, its cost terms and the group it runs over.

Each strategy's file ends with ``STRATEGY = Strategy(...)``; :mod:`.registry` lists them, and the
public API, the cost model and every config's validation read that list.
"""

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor

from .cost_model import CallShape, ComputeModel, Link, Topology, local_kv_bytes


@dataclass(frozen=True)
class Strategy:
    """A distributed strategy as plain functions (no autograd inside).

    ``forward(q, k, v, problem) -> (out, lse)`` and
    ``backward(dout, q, k, v, out, lse, problem) -> (dq, dk, dv)``; the mask is ``problem.mask(...)``.
    ``predicted_bytes(shape, rank, ranks_per_node) -> (fwd, bwd)``: what ``count_communication``
    counts on ``rank``. ``predicted_seconds(shape, link, compute, rank, nbytes) -> (fwd, bwd)``,
    ``nbytes`` being ``predicted_bytes``'s answer for ``rank``. ``peak_kv_bytes(shape)``: the visual
    K/V bytes the busiest rank holds at once for one layer (default: its own shards). ``two_level``: the passes take
    ``groups=HierarchicalGroups`` (a node's inner group and the outer one across nodes) and the cost
    terms a ``ranks_per_node`` / :class:`~.cost_model.Topology`; otherwise they run over any one group.
    """

    name: str
    forward: Callable[..., tuple[Tensor, Tensor]]
    backward: Callable[..., tuple[Tensor, Tensor, Tensor]]
    predicted_bytes: Callable[[CallShape, int, int | None], tuple[int, int]]
    predicted_seconds: Callable[[CallShape, Link | Topology, ComputeModel, int, tuple[int, int]], tuple[float, float]]
    peak_kv_bytes: Callable[[CallShape], int] = local_kv_bytes
    two_level: bool = False
