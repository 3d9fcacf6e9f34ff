"""Llama-3.2-Vision (mllama) on megatron-core, with the visual tokens split over context parallelism.

Each CP rank encodes only its share of the images (whole images, see :mod:`.sharding`), projects
them to the text width and keeps them as its visual shard ``X``; its text shard is a contiguous
piece of the sequence. The decoder is megatron's ``TransformerBlock`` with lvx-megatron's gated
context-parallel cross-attention layers at ``config.cross_attention_layers``; the text side and
the pipeline plumbing are :class:`~.vlm.VisionLanguageModel`'s.
"""

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from ..core import CrossAttentionMask, cross_attention_layer_spec
from .mllama_vision import MllamaVisionEncoder, MultiModalProjector, VisionEncoderConfig
from .vlm import ImageBatch, StageParts, VisionLanguageModel


@dataclass
class MllamaImageBatch(ImageBatch):
    """This rank's images with mllama's inputs: ``aspect_ratio_ids [B, n]`` (first stage only) and
    ``aspect_ratio_mask [B, n, T]`` of this rank's ``n`` images, ``cross_attention_mask [B, S, N, T]``
    of all."""

    aspect_ratio_ids: Tensor | None
    aspect_ratio_mask: Tensor
    cross_attention_mask: Tensor


def visual_tokens_per_image(vision: VisionEncoderConfig, num_tiles: int) -> int:
    """Visual tokens one image of ``num_tiles`` tiles contributes: every tile's patches plus its class token."""
    return num_tiles * (vision.num_patches + 1)


class MllamaModel(VisionLanguageModel):
    """Vision encoder + projector (first stage), gated cross-attention decoder, LM head (last stage).

    Args:
        parts: the decoder config (``visual_hidden_size`` must equal ``hidden_size``: the projector
            maps vision features to the text width), text settings, process groups and stage.
        vision: the vision encoder's config.
        blind_rows: what the cross-attention of a text token that sees no image returns: ``"zero"``
            (Meta's reference) or ``"attend_all"`` (Hugging Face's ``MllamaForConditionalGeneration``:
            such a token attends to every visual token, padded tiles included; its MLP branch is
            zeroed in both).
    """

    def __init__(
        self, parts: StageParts, vision: VisionEncoderConfig, blind_rows: Literal["zero", "attend_all"] = "zero"
    ) -> None:
        config = parts.config
        if blind_rows not in ("zero", "attend_all"):
            raise ValueError(f"blind_rows must be 'zero' or 'attend_all', got {blind_rows!r}")
        if config.visual_hidden_size != config.hidden_size:
            raise ValueError(
                f"visual_hidden_size ({config.visual_hidden_size}) must equal hidden_size ({config.hidden_size}): "
                "the projector maps vision features to the text width"
            )
        super().__init__(parts, cross_attention_layer_spec())
        self.vision_config = vision
        self.freeze_vision_encoder = parts.freeze_vision_encoder
        self.blind_rows = blind_rows
        if parts.pre_process:
            self.vision_model = MllamaVisionEncoder(
                vision, activation_checkpointing=parts.vision_activation_checkpointing
            )
            self.multi_modal_projector = MultiModalProjector(vision.vision_output_dim, config.hidden_size)
            if parts.freeze_vision_encoder:
                self.vision_model.requires_grad_(False)

    def visual_tokens_per_image(self, num_tiles: int) -> int:
        """Visual tokens one image contributes (:func:`visual_tokens_per_image`)."""
        return visual_tokens_per_image(self.vision_config, num_tiles)

    def forward(
        self,
        tokens: Tensor,
        cross_attention_mask: Tensor,
        aspect_ratio_mask: Tensor,
        pixel_values: Tensor | None,
        aspect_ratio_ids: Tensor | None,
        labels: Tensor | None = None,
    ):
        """:meth:`~.vlm.VisionLanguageModel.run` on HF mllama's inputs (full-length; each rank takes its share).

        Args:
            tokens: ``[B, S]`` token ids.
            cross_attention_mask: ``[B, S, N, T]`` 1 where a token may see a tile (HF mllama convention).
            aspect_ratio_mask: ``[B, N, T]`` 1 for real tiles.
            pixel_values: ``[B, N, T, C, H, W]`` (first stage; None on the others).
            aspect_ratio_ids: ``[B, N]``, 0 for padding images (first stage; None on the others).
            labels: ``[B, S]`` next-token targets (last stage).
        """
        batch = self.image_batch(cross_attention_mask, aspect_ratio_mask, pixel_values, aspect_ratio_ids)
        return self.run(tokens, batch, labels)

    def image_batch(
        self,
        cross_attention_mask: Tensor,
        aspect_ratio_mask: Tensor,
        pixel_values: Tensor | None = None,
        aspect_ratio_ids: Tensor | None = None,
    ) -> MllamaImageBatch:
        """This CP rank's share of the images of :meth:`forward`'s inputs (the same arguments)."""
        images = self.local_images(cross_attention_mask.shape[2])
        mine = slice(*images)
        return MllamaImageBatch(
            images=images,
            pixel_values=None if pixel_values is None else pixel_values[:, mine],
            aspect_ratio_ids=None if aspect_ratio_ids is None else aspect_ratio_ids[:, mine],
            aspect_ratio_mask=aspect_ratio_mask[:, mine],
            cross_attention_mask=cross_attention_mask,
        )

    def encode_images(self, batch: MllamaImageBatch) -> Tensor:
        """This rank's images ``[B, n, T, C, H, W]`` -> visual shard ``X`` ``[n*T*(P+1), B, hidden]``."""
        dtype = self.multi_modal_projector.weight.dtype
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze_vision_encoder):
            features = self.vision_model(batch.pixel_values.to(dtype), batch.aspect_ratio_ids, batch.aspect_ratio_mask)
        x = self.multi_modal_projector(features)  # [B, n, T, P+1, hidden]
        return x.flatten(1, 3).transpose(0, 1).contiguous()

    def cross_attention_mask(self, batch: MllamaImageBatch, text: tuple[int, int]) -> CrossAttentionMask:
        """This rank's ``CrossAttentionMask``: ids are ``image * T + tile``, -1 for padding tiles.

        With ``blind_rows="attend_all"`` padding tiles keep their ids (rows that see an image still
        skip them through ``q_mask``) and rows that see no image see every id.
        """
        b, _, n, t = batch.cross_attention_mask.shape
        images = batch.images
        q_mask = batch.cross_attention_mask[:, text[0] : text[1]].reshape(b, text[1] - text[0], n * t).bool()
        ids = torch.arange(images[0] * t, images[1] * t, device=q_mask.device).view(1, -1, t).expand(b, -1, -1)
        rows_see_image = None
        if self.blind_rows == "zero":
            ids = torch.where(batch.aspect_ratio_mask.bool(), ids, -1)
        else:
            rows_see_image = q_mask.any(-1)
            q_mask = q_mask | ~rows_see_image.unsqueeze(-1)
        kv_ids = ids.reshape(b, -1).repeat_interleave(self.visual_tokens_per_image(1), dim=1)  # per tile
        return CrossAttentionMask(q_image_mask=q_mask, kv_image_ids=kv_ids, rows_see_image=rows_see_image)
