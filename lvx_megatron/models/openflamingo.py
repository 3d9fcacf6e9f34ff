"""An OpenFlamingo-style model on megatron-core, with the visual tokens split over context parallelism.

* Vision: a CLIP ViT (:mod:`.vit`; OpenFlamingo: ViT-L/14, 224 px, 256 patch features of width
  1024 per frame) and the Perceiver Resampler (:mod:`.perceiver`; 64 latents per frame). Each CP
  rank encodes and resamples its own images; the latents are ``X`` (width = the ViT's).
* Decoder: the Llama-style megatron decoder with a gated cross-attention block before each layer
  in ``config.cross_attention_layers`` (OpenFlamingo: every ``cross_attn_every_n_layers``-th
  layer, :mod:`lvx_megatron.core.flamingo_layer`).
* Mask: a text token attends only to the latents of its most recent ``<image>`` token (at or
  before it); tokens before the first image get a zero attention output but still run the gated
  feed-forward.
"""

import torch
from torch import Tensor

from ..core import CrossAttentionMask, FlamingoBlockSizes, flamingo_layer_spec
from ..core.flamingo_layer import OPENFLAMINGO_BLOCK
from .perceiver import PerceiverConfig, PerceiverResampler
from .tower_vlm import TowerImageBatch, TowerVisionLanguageModel
from .vit import ViTConfig
from .vlm import StageParts


def latest_image_mask(image_positions: Tensor, rows: tuple[int, int]) -> Tensor:
    """``[B, rows, N]`` bool: row ``t`` sees image ``n`` iff ``n`` is the last image whose ``<image>``
    token is at or before ``t`` (OpenFlamingo's ``only_attend_immediate_media``)."""
    positions = torch.arange(rows[0], rows[1], device=image_positions.device)
    seen = (image_positions[:, None, :] >= 0) & (image_positions[:, None, :] <= positions[None, :, None])
    latest = seen.sum(-1, keepdim=True) - 1  # images are in token order
    return seen & (torch.arange(image_positions.shape[1], device=seen.device) == latest)


def visual_tokens_per_image(perceiver: PerceiverConfig) -> int:
    """Visual tokens one image contributes: the resampler's latents."""
    return perceiver.num_latents


class OpenFlamingoModel(TowerVisionLanguageModel):
    """CLIP tower + Perceiver Resampler (first stage), Flamingo decoder, LM head (last stage).

    Args:
        parts: the decoder config (``visual_hidden_size`` must equal the tower's width), text
            settings, process groups and stage; ``freeze_vision_encoder`` keeps the tower fixed
            (OpenFlamingo trains only the resampler and the gated blocks; the resampler always
            trains here).
        vision: the CLIP tower (``kind="clip"``).
        perceiver: the resampler (``dim`` = the tower's width).
        block: the gated blocks' sizes.
    """

    def __init__(
        self,
        parts: StageParts,
        vision: ViTConfig,
        perceiver: PerceiverConfig,
        block: FlamingoBlockSizes = OPENFLAMINGO_BLOCK,
    ) -> None:
        config = parts.config
        if vision.kind != "clip":
            raise ValueError(f"vision.kind must be 'clip' for OpenFlamingo, got {vision.kind!r}")
        if not config.visual_hidden_size == perceiver.dim == vision.hidden_size:
            raise ValueError(
                f"visual_hidden_size ({config.visual_hidden_size}), perceiver.dim ({perceiver.dim}) and the "
                f"vision tower's hidden_size ({vision.hidden_size}) must be equal"
            )
        super().__init__(parts, flamingo_layer_spec(block), vision)
        self.perceiver_config = perceiver
        if parts.pre_process:
            self.perceiver = PerceiverResampler(perceiver)

    def visual_tokens_per_image(self, num_tiles: int) -> int:
        """The resampler's latents (each image is one tile; :func:`visual_tokens_per_image`)."""
        return visual_tokens_per_image(self.perceiver_config)

    def encode_images(self, batch: TowerImageBatch) -> Tensor:
        """This rank's images ``[B, n, 1, C, H, W]`` -> ``X`` ``[n * num_latents, B, width]``."""
        b, n = batch.pixel_values.shape[:2]
        features = self.tower_features(batch, self.perceiver.latents.dtype)
        media = torch.arange(*batch.images, device=features.device).repeat(b)
        latents = self.perceiver(features.unsqueeze(1), media)  # one frame per medium
        return latents.view(b, n * latents.shape[1], latents.shape[2]).transpose(0, 1).contiguous()

    def cross_attention_mask(self, batch: TowerImageBatch, text: tuple[int, int]) -> CrossAttentionMask:
        """Ids are image indices; each row sees only its most recent image; padding images are -1."""
        q_mask = latest_image_mask(batch.image_positions, text)
        return CrossAttentionMask(q_image_mask=q_mask, kv_image_ids=self.visual_token_ids(batch))
