"""An mPLUG-Owl3-style model on megatron-core, with the visual tokens split over context parallelism.

* Vision: a SigLIP ViT (:mod:`.vit`; mPLUG-Owl3: so400m-patch14-384, the penultimate layer's 729
  patch features of width 1152 per 384-px frame) and a linear projector to the text width (the
  7B-240728 release's ``vision2text_model``). Each CP rank encodes its own images into ``X``.
* Decoder: a Qwen2-style megatron decoder (RMSNorm, SwiGLU, RoPE, GQA, q/k/v biases) whose layers
  at ``config.cross_attention_layers`` are hyper-attention layers
  (:mod:`lvx_megatron.core.hyper_attention`).
* Mask: a text token sees every image whose ``<image>`` token is at or before it; the visual keys
  are rotated by RoPE at that token's position (MI-Rope).
"""

import torch
from torch import Tensor, nn

from ..core import CrossAttentionMask, hyper_attention_layer_spec, hyper_context
from .tower_vlm import TowerImageBatch, TowerVisionLanguageModel
from .vit import ViTConfig
from .vlm import StageParts


def visual_tokens_per_image(vision: ViTConfig) -> int:
    """Visual tokens one image contributes: the tower's patches."""
    return vision.num_patches


class MplugOwl3Model(TowerVisionLanguageModel):
    """SigLIP tower + projector (first stage), hyper-attention decoder, LM head (last stage).

    Args:
        parts: the decoder config (``visual_hidden_size`` = ``hidden_size``: the projector maps
            the features to the text width), text settings, process groups and stage
            (``freeze_vision_encoder``: mPLUG-Owl3 keeps the tower fixed; the projector still trains).
        vision: the SigLIP tower (``kind="siglip"``).
    """

    def __init__(self, parts: StageParts, vision: ViTConfig) -> None:
        config = parts.config
        if vision.kind != "siglip":
            raise ValueError(f"vision.kind must be 'siglip' for mPLUG-Owl3, got {vision.kind!r}")
        if config.visual_hidden_size != config.hidden_size:
            raise ValueError(
                f"visual_hidden_size ({config.visual_hidden_size}) must equal hidden_size ({config.hidden_size}): "
                "the projector maps vision features to the text width"
            )
        super().__init__(parts, hyper_attention_layer_spec(), vision)
        if parts.pre_process:
            self.vision2text_model = nn.Linear(vision.hidden_size, config.hidden_size)

    def visual_tokens_per_image(self, num_tiles: int) -> int:
        """The tower's patches (each image is one tile; :func:`visual_tokens_per_image`)."""
        return visual_tokens_per_image(self.vision_config)

    def encode_images(self, batch: TowerImageBatch) -> Tensor:
        """This rank's images ``[B, n, 1, C, H, W]`` -> ``X`` ``[n * patches, B, hidden]``."""
        b, n = batch.pixel_values.shape[:2]
        x = self.vision2text_model(self.tower_features(batch, self.vision2text_model.weight.dtype))
        return x.view(b, n * x.shape[1], x.shape[2]).transpose(0, 1).contiguous()

    def cross_attention_mask(self, batch: TowerImageBatch, text: tuple[int, int]) -> CrossAttentionMask:
        """Ids are image indices; row ``t`` sees the images whose ``<image>`` token is at ``<= t``."""
        positions = batch.image_positions
        rows = torch.arange(text[0], text[1], device=positions.device)
        q_mask = (positions[:, None, :] >= 0) & (positions[:, None, :] <= rows[None, :, None])
        return CrossAttentionMask(q_image_mask=q_mask, kv_image_ids=self.visual_token_ids(batch))

    def decoder_context(self, x: Tensor, batch: TowerImageBatch, seq_length: int) -> Tensor:
        """``[X, cos, sin]``: MI-Rope rotates each image's keys to its ``<image>`` token's position."""
        positions = batch.image_positions[:, slice(*batch.images)].clamp(min=0)  # padding images: never seen
        freqs = self.rotary.get_emb(seq_length)[:, 0, 0, : self.config.kv_channels // 2].to(x.device)  # [S, d/2]
        per_token = freqs[positions].repeat_interleave(self.visual_tokens_per_image(1), dim=1)  # [B, s_vis, d/2]
        return hyper_context(x, per_token.transpose(0, 1))
