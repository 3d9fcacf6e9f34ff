"""Every strategy, registered once: the public API, the cost model and the configs read this.

A strategy is one file with its passes and cost terms ending in ``STRATEGY = Strategy(...)``
(:class:`~.strategy.Strategy`); registering it is one entry in ``_REGISTERED``. The order is the
cost model's order of preference between equal predictions.
"""

from collections.abc import Mapping
from types import MappingProxyType

from . import hierarchical, kv_allgather, kv_ring, q_allgather, query_ring
from .strategy import Strategy

_REGISTERED = (
    query_ring.STRATEGY,
    kv_ring.STRATEGY,
    q_allgather.STRATEGY,
    kv_allgather.STRATEGY,
    hierarchical.STRATEGY,
)
# Every default: the cost model picks a registered strategy per call (lvx_megatron.ops.api), or
# per layer at its first call (lvx_megatron.ops.policy).
AUTO = "auto"

REGISTRY: Mapping[str, Strategy] = MappingProxyType({s.name: s for s in _REGISTERED})
# Strategies over any one process group, and those over the two levels of a HierarchicalGroups.
STRATEGIES: Mapping[str, Strategy] = MappingProxyType({n: s for n, s in REGISTRY.items() if not s.two_level})
TWO_LEVEL_STRATEGIES: Mapping[str, Strategy] = MappingProxyType({n: s for n, s in REGISTRY.items() if s.two_level})
