"""What a model's cross-attention layers decide once: the strategy of ``"auto"``, the links it
assumes, the two-level groups; and the call with or without the visual K/V kept for backward.

A model holds one :class:`SharedComm` (its layers share it: each two-level split of the CP group
and each link probe is made once, collectively, at the first call that needs it, which every
rank of the group reaches at the same layer). Each layer holds one :class:`CrossAttentionOp`,
which remembers its strategy (``"auto"``: the cost model's choice at its first call).
"""

from collections.abc import Callable
from dataclasses import dataclass, field

import torch.distributed as dist
from torch import Tensor

from .api import distributed_cross_attention, recomputed_kv_cross_attention
from .auto import choose_for_call, default_link
from .backends import BlockAttentionBackend
from .cost_model import Link, Topology
from .groups import HierarchicalGroups, hierarchical_groups
from .link_probe import probe_link
from .mask_plan import MaskPlan
from .registry import AUTO, REGISTRY
from .settings import check_strategy_name

LINK_SOURCES = ("config", "probe")


@dataclass
class SharedComm:
    """Groups and links derived from a CP group, made once per ``(group, ranks per node)``.

    Held by the model (through its config), never module-global: a new model, or a new set of
    process groups, starts empty. Copies of a config share it (``copy.deepcopy`` too: it holds
    process groups, which are handles, not data).
    """

    two_level_groups: dict[tuple[object, int], HierarchicalGroups] = field(default_factory=dict)
    probed_links: dict[tuple[object, int | None], Link | Topology] = field(default_factory=dict)

    def __deepcopy__(self, memo: dict) -> "SharedComm":
        return self

    def groups(self, group: dist.ProcessGroup | None, ranks_per_node: int) -> HierarchicalGroups:
        """``group`` split into nodes of ``ranks_per_node`` consecutive ranks (collective the first time)."""
        key = (group, ranks_per_node)
        if key not in self.two_level_groups:
            self.two_level_groups[key] = hierarchical_groups(ranks_per_node, group)
        return self.two_level_groups[key]

    def probe(self, group: dist.ProcessGroup | None, ranks_per_node: int | None) -> Link | Topology:
        """``group``'s ring link, or with ``ranks_per_node`` the links inside and between nodes,
        measured once (collective the first time) and printed by rank 0."""
        key = (group, ranks_per_node)
        if key not in self.probed_links:
            if ranks_per_node is None:
                self.probed_links[key] = probe_link(group)
            else:
                groups = self.groups(group, ranks_per_node)
                inner = probe_link(groups.inner, agree_over=group)
                self.probed_links[key] = Topology(ranks_per_node, inner, probe_link(groups.outer, agree_over=group))
            if dist.get_rank() == 0:
                print(f"cross-attention links probed: {describe_links(self.probed_links[key])}", flush=True)
        return self.probed_links[key]


def describe_links(links: Link | Topology) -> str:
    """``"1.4 GB/s, 210 us"``, or the links inside and between nodes."""
    one = lambda link: f"{link.bandwidth / 1e9:.3g} GB/s, {link.latency * 1e6:.3g} us"
    if isinstance(links, Link):
        return one(links)
    return f"inside a node ({links.ranks_per_node} ranks) {one(links.inner)}; between nodes {one(links.outer)}"


def configured_link(gbps: float | None, latency_us: float | None, group: dist.ProcessGroup | None) -> Link:
    """A link from settings (latency 10 us when only the bandwidth is given), else by backend."""
    if not gbps:
        return default_link(group)
    return Link(bandwidth=gbps * 1e9, latency=(latency_us or 10.0) * 1e-6)


@dataclass(frozen=True)
class LinkSettings:
    """What ``"auto"`` assumes of the CP group, and how the two-level strategies split it.

    ``source``: ``"config"`` (the fields below; None: by backend, :data:`~.auto.DEFAULT_LINKS`) or
    ``"probe"`` (measured at the first ``"auto"`` call). ``gbps``/``latency_us``: the CP ring's
    link, with ``ranks_per_node`` the one between nodes; ``inner_*``: the link inside a node.
    """

    source: str = "config"
    ranks_per_node: int | None = None
    gbps: float | None = None
    latency_us: float | None = None
    inner_gbps: float | None = None
    inner_latency_us: float | None = None

    def __post_init__(self) -> None:
        if self.source not in LINK_SOURCES:
            raise ValueError(f"source must be one of {list(LINK_SOURCES)}, got {self.source!r}")

    def resolve(self, shared: SharedComm, group: dist.ProcessGroup | None) -> Link | Topology:
        """One link, or a :class:`~.cost_model.Topology` with ranks per node."""
        if self.source == "probe":
            return shared.probe(group, self.ranks_per_node)
        link = configured_link(self.gbps, self.latency_us, group)
        if self.ranks_per_node is None:
            return link
        return Topology(
            self.ranks_per_node, inner=configured_link(self.inner_gbps, self.inner_latency_us, group), outer=link
        )


class CrossAttentionOp:
    """One layer's distributed cross-attention: strategy (``"auto"`` chosen at the first call and
    kept), groups and links from a :class:`SharedComm`, and the call itself.

    Args:
        strategy: ``"auto"`` or a registered strategy name.
        links: what ``"auto"`` assumes; ``ranks_per_node`` for the two-level strategies.
        shared: the model's :class:`SharedComm`.
        name: how the log line of ``"auto"``'s choice names the layer.
    """

    def __init__(self, strategy: str, links: LinkSettings, shared: SharedComm, name: str = "cross-attention") -> None:
        check_strategy_name(strategy, "strategy", links.ranks_per_node, "links.ranks_per_node")
        self.strategy = strategy
        self.links = links
        self.shared = shared
        self.name = name

    def __call__(
        self,
        q: Tensor,
        x: Tensor,
        kv_projection: Callable[[Tensor], tuple[Tensor, Tensor]],
        kv_shape: tuple[int, int, int, int],
        *,
        group: dist.ProcessGroup | None,
        mask_plan: MaskPlan | None = None,
        softmax_scale: float | None = None,
        backend: str | BlockAttentionBackend = "auto",
        recompute_kv: bool = False,
    ) -> Tensor:
        """Attention of ``q`` ``[B, Sq_local, Hq, D]`` to ``k, v = kv_projection(x)`` over ``group``.

        ``kv_shape``: the shape ``[B, Skv_local, Hkv, D]`` of ``k``, which ``"auto"`` chooses from
        before anything is projected.
        ``recompute_kv``: keep no K/V for backward; :func:`~.api.recomputed_kv_cross_attention`.
        Collective over ``group`` (as :func:`~.api.distributed_cross_attention`).
        """
        if self.strategy == AUTO:
            self._choose(q, kv_shape, group, mask_plan)
        if REGISTRY[self.strategy].two_level:
            group = self.shared.groups(group, self.links.ranks_per_node)
        kwargs = dict(
            group=group, strategy=self.strategy, softmax_scale=softmax_scale, mask_plan=mask_plan, backend=backend
        )
        if recompute_kv:
            return recomputed_kv_cross_attention(q, x, kv_projection, **kwargs)
        k, v = kv_projection(x)
        return distributed_cross_attention(q, k, v, **kwargs)

    def _choose(self, q: Tensor, kv_shape: tuple[int, int, int, int], group, plan: MaskPlan | None) -> None:
        """Replace ``"auto"`` by the cost model's fastest strategy for this call's shapes, and log it."""
        self.strategy, predictions = choose_for_call(
            q, kv_shape, group=group, mask_plan=plan, link=self.links.resolve(self.shared, group)
        )
        if dist.is_initialized() and dist.get_rank() == 0:
            times = ", ".join(f"{n} {p.total_s * 1e3:.3g}" for n, p in predictions.items())
            print(f"{self.name}: auto chose {self.strategy} (predicted fwd+bwd ms: {times})", flush=True)
