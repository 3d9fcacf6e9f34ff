"""Two-level process groups: a fast inner group (the GPUs of one node) and a slow outer one (across nodes).

Consecutive ranks of the parent group form a node: parent rank ``r = node * ranks_per_node + local``.
The inner group of a rank holds the ``ranks_per_node`` ranks of its node (inner rank = ``local``); its
outer group holds the ranks with the same ``local`` index on every node (outer rank = ``node``). Shards
are ordered node-major, so gathered or merged results are the same as over the flat parent group.
"""

from dataclasses import dataclass

import torch.distributed as dist


def rank_and_size(group: dist.ProcessGroup | None) -> tuple[bool, int, int]:
    """``(distributed, rank, world_size)`` of this process in ``group`` (None: the default group
    when ``torch.distributed`` is initialised, else one process); a ``group`` without
    ``torch.distributed`` initialised is a ValueError."""
    distributed = dist.is_available() and dist.is_initialized()
    if group is not None and not distributed:
        raise ValueError("group was given but torch.distributed is not initialised")
    if not distributed:
        return False, 0, 1
    return True, dist.get_rank(group), dist.get_world_size(group)


@dataclass(frozen=True)
class HierarchicalGroups:
    """This rank's inner (same node) and outer (same local index, across nodes) groups.

    ``parent`` is the flat group they split (None: the default group); strategies other than
    ``"hierarchical"`` given a ``HierarchicalGroups`` run over ``parent``.
    """

    inner: dist.ProcessGroup
    outer: dist.ProcessGroup
    ranks_per_node: int
    num_nodes: int
    parent: dist.ProcessGroup | None = None

    @property
    def world_size(self) -> int:
        return self.ranks_per_node * self.num_nodes

    @property
    def local_rank(self) -> int:
        """This rank's index inside its node (its rank in ``inner``)."""
        return dist.get_rank(self.inner)

    @property
    def node(self) -> int:
        """This rank's node (its rank in ``outer``)."""
        return dist.get_rank(self.outer)


def hierarchical_groups(ranks_per_node: int, group: dist.ProcessGroup | None = None) -> HierarchicalGroups:
    """Split ``group`` (None: the default group) into nodes of ``ranks_per_node`` consecutive ranks.

    With ``group=None`` every process of the default group must call it (it calls ``new_group``
    for every inner, then every outer group, in the same order on every rank). With a subgroup,
    every member of that group must call it (the subgroups are made with
    ``use_local_synchronization=True``), after the same sequence of earlier ``new_group`` calls.
    """
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("hierarchical_groups needs torch.distributed to be initialised")
    if group is dist.group.WORLD:
        group = None
    ranks = dist.get_process_group_ranks(group or dist.group.WORLD)  # global ranks in parent-rank order
    world = len(ranks)
    if isinstance(ranks_per_node, bool) or not isinstance(ranks_per_node, int) or ranks_per_node < 1:
        raise ValueError(f"ranks_per_node must be a positive int, got {ranks_per_node!r}")
    if world % ranks_per_node:
        raise ValueError(f"ranks_per_node ({ranks_per_node}) must divide the group's world size ({world})")
    num_nodes = world // ranks_per_node
    kwargs = {} if group is None else {"use_local_synchronization": True}
    me = dist.get_rank(group)
    node, local = divmod(me, ranks_per_node)
    inner = outer = None
    for a in range(num_nodes):
        pg = dist.new_group([ranks[a * ranks_per_node + i] for i in range(ranks_per_node)], **kwargs)
        if a == node:
            inner = pg
    for i in range(ranks_per_node):
        pg = dist.new_group([ranks[a * ranks_per_node + i] for a in range(num_nodes)], **kwargs)
        if i == local:
            outer = pg
    groups = HierarchicalGroups(inner, outer, ranks_per_node, num_nodes, group)
    if (groups.local_rank, groups.node) != (local, node):
        raise ValueError(
            f"the group's ranks must be in increasing global order to form nodes, got global ranks {ranks}"
        )
    return groups


def check_hierarchical_groups(groups: HierarchicalGroups, rank: int, world_size: int) -> None:
    """Raise ValueError unless ``groups`` splits a flat group of ``world_size`` where this rank is ``rank``."""
    if groups.world_size != world_size:
        raise ValueError(
            f"group=HierarchicalGroups has {groups.num_nodes} nodes x {groups.ranks_per_node} ranks, "
            f"but its parent group has {world_size} ranks"
        )
    sizes = (dist.get_world_size(groups.inner), dist.get_world_size(groups.outer))
    if sizes != (groups.ranks_per_node, groups.num_nodes):
        raise ValueError(f"inner/outer group sizes {sizes} != ({groups.ranks_per_node}, {groups.num_nodes})")
    if groups.node * groups.ranks_per_node + groups.local_rank != rank:
        raise ValueError(
            f"rank {rank} of the parent group must be node * ranks_per_node + local "
            f"= {groups.node} * {groups.ranks_per_node} + {groups.local_rank}"
        )
