"""The cross-attention mask as it travels through a megatron ``TransformerBlock``.

``TransformerBlock.forward(context=X, context_mask=...)`` hands ``context_mask`` unchanged to
every layer, so the two sharded mask tensors of the ops API travel together in one object.
"""

from dataclasses import dataclass

from torch import Tensor


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
    """

    q_image_mask: Tensor | None = None
    kv_image_ids: Tensor | None = None
    rows_see_image: Tensor | None = None

    def text_rows_visible(self) -> Tensor | None:
        """``[B, S_text_local]`` bool: text tokens that see at least one image."""
        if self.rows_see_image is not None:
            return self.rows_see_image
        return None if self.q_image_mask is None else self.q_image_mask.any(-1)
