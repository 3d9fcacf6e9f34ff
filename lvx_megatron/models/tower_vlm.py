"""The vision side shared by the ViT-tower models (OpenFlamingo-style, mPLUG-Owl3-style): one tile per
image, a CLIP/SigLIP tower on the first pipeline stage, images placed in the text by the token index
of their ``<image>`` token."""

from dataclasses import dataclass

import torch
from megatron.core.transformer.spec_utils import ModuleSpec
from torch import Tensor

from .vit import ViTConfig, ViTVisionTower
from .vlm import ImageBatch, StageParts, VisionLanguageModel


@dataclass
class TowerImageBatch(ImageBatch):
    """This rank's images (one tile each) and ``image_positions [B, N]``: the token index of each of
    the sample's images' ``<image>`` token (-1: padding image), all images."""

    image_positions: Tensor


class TowerVisionLanguageModel(VisionLanguageModel):
    """A :class:`VisionLanguageModel` whose first stage holds a ViT tower (``vision_model``).

    Args:
        vision: the tower (``parts.freeze_vision_encoder`` keeps it fixed;
            ``parts.vision_activation_checkpointing`` recomputes each of its layers in backward). The
            other arguments are :class:`VisionLanguageModel`'s.
    """

    def __init__(self, parts: StageParts, cross_attention_spec: ModuleSpec, vision: ViTConfig) -> None:
        super().__init__(parts, cross_attention_spec)
        self.vision_config = vision
        self.freeze_vision_encoder = parts.freeze_vision_encoder
        if parts.pre_process:
            self.vision_model = ViTVisionTower(vision, activation_checkpointing=parts.vision_activation_checkpointing)
            if parts.freeze_vision_encoder:
                self.vision_model.requires_grad_(False)

    def forward(
        self, tokens: Tensor, image_positions: Tensor, pixel_values: Tensor | None = None, labels: Tensor | None = None
    ):
        """:meth:`~.vlm.VisionLanguageModel.run` on a micro-batch (full-length; each rank takes its share).

        Args:
            tokens: ``[B, S]`` token ids.
            image_positions: ``[B, N]`` token index of each image's ``<image>`` token, -1 for padding images.
            pixel_values: ``[B, N, 1, C, H, W]`` (first stage only).
            labels: ``[B, S]`` next-token targets (last stage).
        """
        return self.run(tokens, self.image_batch(image_positions, pixel_values), labels)

    def image_batch(self, image_positions: Tensor, pixel_values: Tensor | None = None) -> TowerImageBatch:
        """This CP rank's share of the images of :meth:`forward`'s inputs (the same arguments)."""
        images = self.local_images(image_positions.shape[1])
        local_pixels = None if pixel_values is None else pixel_values[:, slice(*images)]
        return TowerImageBatch(images, local_pixels, image_positions)

    def tower_features(self, batch: TowerImageBatch, dtype: torch.dtype) -> Tensor:
        """This rank's images ``[B, n, 1, C, H, W]`` -> patch features ``[B * n, patches, width]``."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze_vision_encoder):
            return self.vision_model(batch.pixel_values.flatten(0, 2).to(dtype))

    def visual_token_ids(self, batch: TowerImageBatch) -> Tensor:
        """``[B, n * tokens per image]``: the image index of each of this rank's visual tokens, -1 for
        padding images (never attended)."""
        positions = batch.image_positions
        start, stop = batch.images
        ids = torch.arange(start, stop, device=positions.device).expand(positions.shape[0], -1)
        ids = torch.where(positions[:, start:stop] >= 0, ids, -1)
        return ids.repeat_interleave(self.visual_tokens_per_image(1), dim=1)
