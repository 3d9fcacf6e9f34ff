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
from megatron.core.process_groups_config import ProcessGroupCollection
from torch import Tensor, nn

from ..core import CrossAttentionMask, CrossAttentionTransformerConfig, hyper_attention_layer_spec, hyper_context
from .vit import ViTConfig, ViTVisionTower
from .vlm import ImageBatch, TextSettings, VisionLanguageModel


class MplugOwl3Model(VisionLanguageModel):
    """SigLIP tower + projector (first stage), hyper-attention decoder, LM head (last stage).

    Args:
        config: the decoder config (``visual_hidden_size`` = ``hidden_size``: the projector maps
            the features to the text width).
        text: vocabulary and RoPE settings.
        vision: the SigLIP tower (``kind="siglip"``).
        pg_collection: process groups (``tp``, ``cp``, ``pp``).
        pre_process / post_process: first / last pipeline stage.
        freeze_vision_encoder: keep the tower fixed (mPLUG-Owl3 does; the projector still trains).
        vision_activation_checkpointing: recompute each tower layer in backward.
    """

    def __init__(
        self,
        config: CrossAttentionTransformerConfig,
        text: TextSettings,
        vision: ViTConfig,
        pg_collection: ProcessGroupCollection,
        pre_process: bool = True,
        post_process: bool = True,
        freeze_vision_encoder: bool = False,
        vision_activation_checkpointing: bool = False,
    ) -> None:
        if vision.kind != "siglip":
            raise ValueError(f"vision.kind must be 'siglip' for mPLUG-Owl3, got {vision.kind!r}")
        if config.visual_hidden_size != config.hidden_size:
            raise ValueError(
                f"visual_hidden_size ({config.visual_hidden_size}) must equal hidden_size ({config.hidden_size}): "
                "the projector maps vision features to the text width"
            )
        super().__init__(config, text, pg_collection, hyper_attention_layer_spec(), pre_process, post_process)
        self.vision_config = vision
        self.freeze_vision_encoder = freeze_vision_encoder
        if pre_process:
            self.vision_model = ViTVisionTower(vision, activation_checkpointing=vision_activation_checkpointing)
            self.vision2text_model = nn.Linear(vision.hidden_size, config.hidden_size)
            if freeze_vision_encoder:
                self.vision_model.requires_grad_(False)

    def visual_tokens_per_image(self, num_tiles: int) -> int:
        """The tower's patches (each image is one tile)."""
        return self.vision_config.num_patches

    def encode_images(self, batch: ImageBatch) -> Tensor:
        """This rank's images ``[B, n, 1, C, H, W]`` -> ``X`` ``[n * patches, B, hidden]``."""
        pixels = batch.pixel_values
        b, n = pixels.shape[:2]
        dtype = self.vision2text_model.weight.dtype
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze_vision_encoder):
            features = self.vision_model(pixels.flatten(0, 2).to(dtype))  # [B * n, patches, width]
        x = self.vision2text_model(features)
        return x.view(b, n * x.shape[1], x.shape[2]).transpose(0, 1).contiguous()

    def cross_attention_mask(
        self, cross_attention_mask: Tensor, batch: ImageBatch, text: tuple[int, int]
    ) -> CrossAttentionMask:
        """Ids are image indices; row ``t`` sees the images whose ``<image>`` token is at ``<= t``."""
        positions = self._positions(batch)
        start, stop = batch.images
        ids = torch.arange(start, stop, device=positions.device).expand(positions.shape[0], -1)
        ids = torch.where(positions[:, start:stop] >= 0, ids, -1)
        rows = torch.arange(text[0], text[1], device=positions.device)
        q_mask = (positions[:, None, :] >= 0) & (positions[:, None, :] <= rows[None, :, None])
        kv_ids = ids.repeat_interleave(self.vision_config.num_patches, dim=1)
        return CrossAttentionMask(q_image_mask=q_mask, kv_image_ids=kv_ids)

    def decoder_context(self, x: Tensor, batch: ImageBatch, seq_length: int) -> Tensor:
        """``[X, cos, sin]``: MI-Rope rotates each image's keys to its ``<image>`` token's position."""
        positions = self._positions(batch)[:, slice(*batch.images)].clamp(min=0)  # padding images: never seen
        freqs = self.rotary.get_emb(seq_length)[:, 0, 0, : self.config.kv_channels // 2].to(x.device)  # [S, d/2]
        per_token = freqs[positions].repeat_interleave(self.vision_config.num_patches, dim=1)  # [B, s_vis, d/2]
        return hyper_context(x, per_token.transpose(0, 1))

    @staticmethod
    def _positions(batch: ImageBatch) -> Tensor:
        if batch.image_positions is None:
            raise ValueError("MplugOwl3Model needs image_positions (the <image> token of each image)")
        return batch.image_positions
