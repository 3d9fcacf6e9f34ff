"""The vision side shared by the ViT-tower models (OpenFlamingo-style, mPLUG-Owl3-style): one tile per
image, a CLIP/SigLIP tower on the first pipeline stage, images placed in the text by the token index
of their ``<image>`` token."""

import torch
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.spec_utils import ModuleSpec
from torch import Tensor

from ..core import CrossAttentionTransformerConfig
from .vit import ViTConfig, ViTVisionTower
from .vlm import ImageBatch, TextSettings, VisionLanguageModel


class TowerVisionLanguageModel(VisionLanguageModel):
    """A :class:`VisionLanguageModel` whose first stage holds a ViT tower (``vision_model``).

    Args:
        vision: the tower; ``freeze_vision_encoder`` keeps it fixed; ``vision_activation_checkpointing``
            recomputes each of its layers in backward. The other arguments are
            :class:`VisionLanguageModel`'s.
    """

    def __init__(
        self,
        config: CrossAttentionTransformerConfig,
        text: TextSettings,
        pg_collection: ProcessGroupCollection,
        cross_attention_spec: ModuleSpec,
        vision: ViTConfig,
        pre_process: bool = True,
        post_process: bool = True,
        freeze_vision_encoder: bool = False,
        vision_activation_checkpointing: bool = False,
    ) -> None:
        super().__init__(config, text, pg_collection, cross_attention_spec, pre_process, post_process)
        self.vision_config = vision
        self.freeze_vision_encoder = freeze_vision_encoder
        if pre_process:
            self.vision_model = ViTVisionTower(vision, activation_checkpointing=vision_activation_checkpointing)
            if freeze_vision_encoder:
                self.vision_model.requires_grad_(False)

    def tower_features(self, batch: ImageBatch, dtype: torch.dtype) -> Tensor:
        """This rank's images ``[B, n, 1, C, H, W]`` -> patch features ``[B * n, patches, width]``."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze_vision_encoder):
            return self.vision_model(batch.pixel_values.flatten(0, 2).to(dtype))

    def image_positions(self, batch: ImageBatch) -> Tensor:
        """``[B, N]`` token index of each image's ``<image>`` token (-1: padding image)."""
        if batch.image_positions is None:
            raise ValueError(f"{type(self).__name__} needs image_positions (the <image> token of each image)")
        return batch.image_positions

    def visual_token_ids(self, batch: ImageBatch) -> Tensor:
        """``[B, n * tokens per image]``: the image index of each of this rank's visual tokens, -1 for
        padding images (never attended)."""
        positions = self.image_positions(batch)
        start, stop = batch.images
        ids = torch.arange(start, stop, device=positions.device).expand(positions.shape[0], -1)
        ids = torch.where(positions[:, start:stop] >= 0, ids, -1)
        return ids.repeat_interleave(self.visual_tokens_per_image(1), dim=1)
