"""Causal self-attention over text split across the context-parallel group.

The text is short next to the video, so every CP rank all-gathers the text keys/values (uneven
shard lengths allowed) and attends its own query rows to them with the causal mask of their
global positions. Used as megatron's ``core_attention`` inside a :class:`TextSelfAttention`.

Generation (:mod:`lvx_megatron.generation`) replicates the text instead: every CP rank holds the
whole prompt and megatron's KV cache holds the whole prefix, so nothing is gathered. The signal is
explicit: megatron hands an ``inference_context`` to the ``SelfAttention``, never to its core
attention, so :class:`TextSelfAttention` tells the core attention for the length of the call.
"""

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from torch import Tensor


def gather_lengths(length: int, group: dist.ProcessGroup | None, device: torch.device) -> list[int]:
    """Every rank's ``length`` (one small all-gather); ``[length]`` without a group."""
    if group is None or group.size() == 1:
        return [length]
    if dist.get_backend(group) != "nccl":
        device = torch.device("cpu")
    mine = torch.tensor([length], dtype=torch.int64, device=device)
    out = [torch.empty_like(mine) for _ in range(group.size())]
    dist.all_gather(out, mine, group=group)
    return [int(t.item()) for t in out]


class _AllGatherSequence(torch.autograd.Function):
    """All-gather ``[B, S_local, ...]`` shards of uneven length along dim 1.

    Backward sums every rank's gradient of the gathered tensor and keeps this rank's rows.
    """

    @staticmethod
    def forward(ctx, x: Tensor, group: dist.ProcessGroup, lengths: list[int]) -> Tensor:
        rank = group.rank()
        longest = max(lengths)
        padded = x.new_zeros((x.shape[0], longest, *x.shape[2:]))
        padded[:, : x.shape[1]] = x
        parts = [torch.empty_like(padded) for _ in lengths]
        dist.all_gather(parts, padded.contiguous(), group=group)
        ctx.group, ctx.start, ctx.length = group, sum(lengths[:rank]), lengths[rank]
        return torch.cat([p[:, :n] for p, n in zip(parts, lengths, strict=True)], dim=1)

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad[:, ctx.start : ctx.start + ctx.length], None, None


class TextContextParallelAttention(MegatronModule):
    """megatron ``core_attention``: causal attention of CP-split text with all-gathered K/V.

    Takes megatron's layout (q ``[sq, b, np, hn]``, k/v ``[sk, b, ng, hn]`` for this rank's
    text shard, GQA when ``ng < np``) and returns ``[sq, b, np * hn]``. Shards are contiguous
    pieces of the text in rank order and may differ in length.

    ``replicated_text`` (set per call by :class:`TextSelfAttention`): the keys are the whole text on
    every CP rank (megatron's KV cache during generation) and the queries its last ``sq`` rows.
    """

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        cp_comm_type: str | None = None,
        softmax_scale: float | None = None,
        pg_collection: ProcessGroupCollection | None = None,
    ) -> None:
        super().__init__(config=config)
        if attn_mask_type not in (AttnMaskType.causal, AttnMaskType.no_mask):
            raise ValueError(f"attn_mask_type must be causal or no_mask, got {attn_mask_type}")
        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["cp"])
        self.cp_group = pg_collection.cp
        self.causal = attn_mask_type == AttnMaskType.causal
        self.softmax_scale = softmax_scale
        self.dropout = config.attention_dropout
        self.replicated_text = False

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attention_mask: Tensor | None,
        attn_mask_type: AttnMaskType | None = None,
        attention_bias: Tensor | None = None,
        packed_seq_params=None,
    ) -> Tensor:
        if attention_bias is not None or packed_seq_params is not None:
            raise ValueError("TextContextParallelAttention takes neither attention_bias nor packed_seq_params")
        sq, b, np_, hn = query.shape
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, heads, s, hn]
        if self.replicated_text:  # the queries are the newest rows of the cached text
            lengths, start = [key.shape[0]], key.shape[0] - sq
        else:
            lengths = gather_lengths(sq, self.cp_group, query.device)
            start = sum(lengths[: self.cp_group.rank()]) if self.cp_group.size() > 1 else 0
        if len(lengths) > 1:
            k = _AllGatherSequence.apply(k.transpose(1, 2), self.cp_group, lengths).transpose(1, 2)
            v = _AllGatherSequence.apply(v.transpose(1, 2), self.cp_group, lengths).transpose(1, 2)
        allowed = None
        if (attn_mask_type or (AttnMaskType.causal if self.causal else AttnMaskType.no_mask)) == AttnMaskType.causal:
            q_pos = torch.arange(start, start + sq, device=query.device)
            allowed = torch.arange(k.shape[2], device=query.device)[None, :] <= q_pos[:, None]
        if attention_mask is not None:  # megatron convention: True = masked out, [b, 1, sq, S]
            keep = ~attention_mask
            allowed = keep if allowed is None else keep & allowed
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=allowed,
            dropout_p=self.dropout if self.training else 0.0,
            scale=self.softmax_scale,
            enable_gqa=k.shape[1] != np_,
        )
        return out.permute(2, 0, 1, 3).reshape(sq, b, np_ * hn)


@contextmanager
def text_layout(core_attention: MegatronModule, replicated: bool) -> Iterator[None]:
    """Within the block, ``core_attention`` (anything with a ``replicated_text`` attribute) treats the
    text as replicated on every CP rank (``replicated``) or split over CP."""
    before = core_attention.replicated_text
    core_attention.replicated_text = replicated
    try:
        yield
    finally:
        core_attention.replicated_text = before


class TextSelfAttention(SelfAttention):
    """megatron's ``SelfAttention`` that tells its core attention how the text lies over CP.

    Without an ``inference_context`` (training, the full forward) each CP rank holds a contiguous
    shard of the text; with one (KV-cached generation) every rank holds all of it.
    """

    def forward(self, *args, **kwargs):
        """megatron's forward; the text is replicated over CP exactly when an inference context is given."""
        # SelfAttention.forward(hidden_states, attention_mask, key_value_states, inference_context, ...)
        context = kwargs.get("inference_context", args[3] if len(args) > 3 else None)
        cached = context is not None or kwargs.get("inference_params") is not None
        with text_layout(self.core_attention, replicated=cached):
            return super().forward(*args, **kwargs)
