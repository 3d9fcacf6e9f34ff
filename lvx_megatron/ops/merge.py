"""Log-sum-exp merge of partial attention results.

A partial result of a query block against one KV shard is ``(o, lse)`` with ``o`` already
normalised by its own softmax denominator. Two partials of the same queries against disjoint
key sets combine exactly with the weights ``exp(lse_i - lse)``.
"""

import torch
from torch import Tensor


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for low-precision inputs, fp64 stays fp64."""
    return torch.promote_types(dtype, torch.float32)


def safe_lse(lse: Tensor) -> Tensor:
    """``lse`` with ``-inf`` (rows that see no key) replaced by 0.

    Subtracting it from scores or partial LSEs that are also ``-inf`` then gives
    ``exp(-inf) = 0`` instead of ``exp(nan)``.
    """
    return lse.masked_fill(torch.isneginf(lse), 0.0)


def merge_partials(o_a: Tensor, lse_a: Tensor, o_b: Tensor, lse_b: Tensor) -> tuple[Tensor, Tensor]:
    """Merge two partial attention results of the same query rows.

    Args:
        o_a, o_b: ``[B, Sq, H, D]`` normalised partial outputs.
        lse_a, lse_b: ``[B, Sq, H]`` their log-sum-exp (``-inf`` where a row saw no key).

    Returns:
        ``(o, lse)`` in the accumulation dtype; rows that saw no key in either part stay
        exactly zero with ``lse = -inf``.
    """
    acc = accumulation_dtype(o_a.dtype)
    lse_a = lse_a.to(acc)
    lse_b = lse_b.to(acc)
    lse = torch.logaddexp(lse_a, lse_b)
    ref = safe_lse(lse)
    w_a = torch.exp(lse_a - ref).unsqueeze(-1)
    w_b = torch.exp(lse_b - ref).unsqueeze(-1)
    return w_a * o_a.to(acc) + w_b * o_b.to(acc), lse
