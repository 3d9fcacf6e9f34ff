"""Full tensors <-> tensor-parallel shards of megatron parameters.

megatron marks split parameters with ``tensor_model_parallel`` and ``partition_dim``. A gated
MLP's ``linear_fc1`` holds ``[gate; up]`` and each half is split separately, so its shards are
not plain chunks of the full tensor.
"""

import torch
import torch.distributed as dist
from torch import Tensor


def _is_split(param: Tensor, tp: int) -> bool:
    return tp > 1 and getattr(param, "tensor_model_parallel", False)


def _is_glu_fc1(name: str, gated_linear_unit: bool) -> bool:
    return gated_linear_unit and name.endswith("linear_fc1.weight")


def full_shape(param: Tensor, tp: int) -> list[int]:
    """Shape of the whole parameter of which ``param`` is this TP rank's shard."""
    shape = list(param.shape)
    if _is_split(param, tp):
        shape[param.partition_dim] *= tp
    return shape


def shard_full(full: Tensor, param: Tensor, name: str, gated_linear_unit: bool, tp_rank: int, tp: int) -> Tensor:
    """This TP rank's piece of the whole tensor ``full`` for parameter ``param`` named ``name``."""
    if not _is_split(param, tp):
        return full
    if _is_glu_fc1(name, gated_linear_unit):
        return full.view(2, -1, full.shape[-1]).chunk(tp, dim=1)[tp_rank].reshape(-1, full.shape[-1])
    return full.chunk(tp, dim=param.partition_dim)[tp_rank]


def unshard(local: Tensor, param: Tensor, name: str, gated_linear_unit: bool, tp_group: dist.ProcessGroup) -> Tensor:
    """The whole tensor from every TP rank's piece (inverse of :func:`shard_full`; collective)."""
    tp = tp_group.size()
    if not _is_split(param, tp):
        return local
    parts = [torch.empty_like(local) for _ in range(tp)]
    dist.all_gather(parts, local.contiguous(), group=tp_group)
    if _is_glu_fc1(name, gated_linear_unit):
        halves = [p.view(2, -1, p.shape[-1]) for p in parts]
        return torch.cat(halves, dim=1).reshape(-1, local.shape[-1])
    return torch.cat(parts, dim=param.partition_dim)
