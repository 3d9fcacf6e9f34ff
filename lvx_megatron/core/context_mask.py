"""The cross-attention mask as it travels through a megatron ``TransformerBlock``.

``TransformerBlock.forward(context=X, context_mask=...)`` hands ``context_mask`` unchanged to
every layer, so the sharded mask tensors and the micro-batch's :class:`~lvx_megatron.ops.MaskPlan`
(built once, by :meth:`CrossAttentionMask.planned`) travel together in one object.
"""

import dataclasses
from dataclasses import dataclass

import torch.distributed as dist
from torch import Tensor

from ..ops import MaskPlan


@dataclass
class CrossAttentionMask:
    """Llama-3.2-Vision cross-attention mask of this CP rank's shards.

    Attributes:
        q_image_mask: ``[B, S_text_local, N_ids]`` bool, which image (tile) ids each text token
            of this rank may see.
        kv_image_ids: ``[B, S_visual_local]`` int, image (tile) id of each visual token of this
            rank, ``-1`` for padding.
        rows_see_image: ``[B, S_text_local]`` bool, text tokens that see an image; only needed when
            ``q_image_mask`` was widened for rows that see none (Hugging Face's semantics, where
            those rows attend to every visual token but their MLP branch is still zeroed).
        plan: every CP rank's mask of this micro-batch, what the cross-attention layers pass to
            the ops (None until :meth:`planned`).
    """

    q_image_mask: Tensor | None = None
    kv_image_ids: Tensor | None = None
    rows_see_image: Tensor | None = None
    plan: MaskPlan | None = None

    def planned(self, cp_group: dist.ProcessGroup | None, text_rows: int) -> "CrossAttentionMask":
        """This mask with its plan built over ``cp_group`` (collective; once per micro-batch).

        ``text_rows`` is this rank's text length (the plan needs it when ``q_image_mask`` is None).
        """
        if self.kv_image_ids is None or self.plan is not None:
            return self
        plan = MaskPlan.build(self.q_image_mask, self.kv_image_ids, cp_group, num_queries=text_rows)
        return dataclasses.replace(self, plan=plan)

    def text_rows_visible(self) -> Tensor | None:
        """``[B, S_text_local]`` bool: text tokens that see at least one image."""
        if self.rows_see_image is not None:
            return self.rows_see_image
        return None if self.q_image_mask is None else self.q_image_mask.any(-1)
