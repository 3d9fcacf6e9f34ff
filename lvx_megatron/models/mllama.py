"""Llama-3.2-Vision (mllama) on megatron-core, with the visual tokens split over context parallelism.

Each CP rank encodes only its share of the images (whole images, see :mod:`.sharding`), projects
them to the text width and keeps them as its visual shard ``X``; its text shard is a contiguous
piece of the sequence. The decoder is megatron's ``TransformerBlock`` with lvx-megatron's gated
context-parallel cross-attention layers at ``config.cross_attention_layers``.

Pipeline parallelism: the vision encoder and projector live on the first stage. Every later stage
needs ``X`` too, so a stage sends ``[text hidden states; X]`` concatenated along the sequence
(``pipeline_tensor_shape`` gives megatron's schedule that shape) and the next stage splits them;
``dX`` flows back the same way into the vision encoder.
"""

from dataclasses import dataclass
from typing import Literal

import torch
from megatron.core import tensor_parallel
from megatron.core.models.common.embeddings.language_model_embedding import LanguageModelEmbedding
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_block import TransformerBlock
from torch import Tensor

from ..core import CrossAttentionMask, CrossAttentionTransformerConfig, cross_attention_decoder_block_spec
from .mllama_vision import MllamaVisionEncoder, MultiModalProjector, VisionEncoderConfig
from .sharding import image_range, text_range


@dataclass
class MllamaTextSettings:
    """What the decoder needs beyond ``TransformerConfig``.

    Attributes:
        vocab_size: the tokenizer's vocabulary; the embedding and output layer are padded to a
            multiple of ``make_vocab_size_divisible_by`` (same shapes under every TP size).
        rotary_base: RoPE theta (Llama 3: 500000).
        rope_scaling: Llama-3.1-style RoPE frequency scaling.
        rope_scaling_factor: its factor (Llama 3.2: 8).
        make_vocab_size_divisible_by: vocabulary padding multiple.
    """

    vocab_size: int
    rotary_base: float = 500000.0
    rope_scaling: bool = False
    rope_scaling_factor: float = 8.0
    make_vocab_size_divisible_by: int = 128

    @property
    def padded_vocab_size(self) -> int:
        multiple = self.make_vocab_size_divisible_by
        return -(-self.vocab_size // multiple) * multiple


class MllamaModel(MegatronModule):
    """Vision encoder + projector (first stage), gated cross-attention decoder, LM head (last stage).

    Args:
        config: the decoder config (``visual_hidden_size`` must equal ``hidden_size``: the projector
            maps vision features to the text width).
        text: vocabulary and RoPE settings.
        vision: the vision encoder's config.
        pg_collection: process groups (``tp``, ``cp``, ``pp``).
        pre_process / post_process: first / last pipeline stage.
        freeze_vision_encoder: keep the vision encoder's weights fixed (the projector still trains).
        vision_activation_checkpointing: recompute each vision layer in backward (long videos).
        blind_rows: what the cross-attention of a text token that sees no image returns: ``"zero"``
            (Meta's reference) or ``"attend_all"`` (Hugging Face's ``MllamaForConditionalGeneration``:
            such a token attends to every visual token, padded tiles included; its MLP branch is
            zeroed in both).
    """

    def __init__(
        self,
        config: CrossAttentionTransformerConfig,
        text: MllamaTextSettings,
        vision: VisionEncoderConfig,
        pg_collection: ProcessGroupCollection,
        pre_process: bool = True,
        post_process: bool = True,
        freeze_vision_encoder: bool = False,
        vision_activation_checkpointing: bool = False,
        blind_rows: Literal["zero", "attend_all"] = "zero",
    ) -> None:
        super().__init__(config=config)
        if blind_rows not in ("zero", "attend_all"):
            raise ValueError(f"blind_rows must be 'zero' or 'attend_all', got {blind_rows!r}")
        if config.visual_hidden_size != config.hidden_size:
            raise ValueError(
                f"visual_hidden_size ({config.visual_hidden_size}) must equal hidden_size ({config.hidden_size}): "
                "the projector maps vision features to the text width"
            )
        tp = pg_collection.tp.size()
        if text.padded_vocab_size % tp:
            raise ValueError(
                f"the padded vocabulary ({text.padded_vocab_size}) must be divisible by the tensor-model-parallel "
                f"size ({tp}); choose make_vocab_size_divisible_by as a multiple of {tp}"
            )
        self.pg_collection = pg_collection
        self.text = text
        self.vision_config = vision
        self.pre_process, self.post_process = pre_process, post_process
        self.freeze_vision_encoder = freeze_vision_encoder
        self.blind_rows = blind_rows
        self.model_type = None  # set by the training glue (megatron's ModelType)
        self.share_embeddings_and_output_weights = False  # read by finalize_model_grads (mllama: untied)
        self.input_tensor: Tensor | None = None
        self.rotary = RotaryEmbedding(
            kv_channels=config.kv_channels,
            rotary_percent=1.0,
            rotary_base=text.rotary_base,
            rope_scaling=text.rope_scaling,
            rope_scaling_factor=text.rope_scaling_factor,
            use_cpu_initialization=config.use_cpu_initialization,
        )
        if pre_process:
            self.embedding = LanguageModelEmbedding(
                config,
                text.padded_vocab_size,
                max_sequence_length=0,
                position_embedding_type="none",
                tp_group=pg_collection.tp,
            )
            self.vision_model = MllamaVisionEncoder(vision, activation_checkpointing=vision_activation_checkpointing)
            self.multi_modal_projector = MultiModalProjector(vision.vision_output_dim, config.hidden_size)
            if freeze_vision_encoder:
                self.vision_model.requires_grad_(False)
        pp_rank = pg_collection.pp.rank()
        self.decoder = TransformerBlock(
            config,
            spec=cross_attention_decoder_block_spec(config, pp_rank=pp_rank),
            pre_process=pre_process,
            post_process=post_process,
            pg_collection=pg_collection,
        )
        if post_process:
            self.output_layer = tensor_parallel.ColumnParallelLinear(
                config.hidden_size,
                text.padded_vocab_size,
                config=config,
                init_method=config.init_method,
                bias=False,
                skip_bias_add=False,
                gather_output=False,
                tp_group=pg_collection.tp,
            )

    # --- pipeline plumbing -------------------------------------------------------------------

    def set_input_tensor(self, input_tensor) -> None:
        """megatron's schedules hand the received ``[text; X]`` tensor (in a list) to later stages."""
        self.input_tensor = input_tensor[0] if isinstance(input_tensor, list) else input_tensor

    def visual_tokens_per_image(self, num_tiles: int) -> int:
        """Visual tokens one image contributes: every tile's patches plus its class token."""
        return num_tiles * (self.vision_config.num_patches + 1)

    def local_text_rows(self, seq_length: int) -> int:
        """Text rows this rank holds between stages (divided by TP under sequence parallelism)."""
        rows = seq_length // self.pg_collection.cp.size()
        return rows // self.pg_collection.tp.size() if self.config.sequence_parallel else rows

    def pipeline_tensor_shape(self, seq_length: int, micro_batch_size: int, num_images: int, num_tiles: int):
        """The ``[text; X]`` shape this rank sends and receives between pipeline stages."""
        cp = self.pg_collection.cp
        start, stop = image_range(num_images, cp.size(), cp.rank())
        visual = (stop - start) * self.visual_tokens_per_image(num_tiles)
        return (self.local_text_rows(seq_length) + visual, micro_batch_size, self.config.hidden_size)

    # --- forward -----------------------------------------------------------------------------

    def encode_images(self, pixel_values: Tensor, aspect_ratio_ids: Tensor, aspect_ratio_mask: Tensor) -> Tensor:
        """This rank's images ``[B, n, T, C, H, W]`` -> visual shard ``X`` ``[n*T*(P+1), B, hidden]``."""
        dtype = self.multi_modal_projector.weight.dtype
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze_vision_encoder):
            features = self.vision_model(pixel_values.to(dtype), aspect_ratio_ids, aspect_ratio_mask)
        x = self.multi_modal_projector(features)  # [B, n, T, P+1, hidden]
        return x.flatten(1, 3).transpose(0, 1).contiguous()

    def _cross_attention_mask(self, cross_attention_mask: Tensor, aspect_ratio_mask: Tensor, text, images):
        """This rank's ``CrossAttentionMask``: ids are ``image * T + tile``, -1 for padding tiles.

        With ``blind_rows="attend_all"`` padding tiles keep their ids (rows that see an image still
        skip them through ``q_mask``) and rows that see no image see every id.
        """
        b, _, n, t = cross_attention_mask.shape
        q_mask = cross_attention_mask[:, text[0] : text[1]].reshape(b, text[1] - text[0], n * t).bool()
        ids = torch.arange(images[0] * t, images[1] * t, device=q_mask.device).view(1, -1, t).expand(b, -1, -1)
        rows_see_image = None
        if self.blind_rows == "zero":
            ids = torch.where(aspect_ratio_mask[:, images[0] : images[1]].bool(), ids, -1)
        else:
            rows_see_image = q_mask.any(-1)
            q_mask = q_mask | ~rows_see_image.unsqueeze(-1)
        kv_ids = ids.reshape(b, -1).repeat_interleave(self.vision_config.num_patches + 1, dim=1)
        return CrossAttentionMask(q_image_mask=q_mask, kv_image_ids=kv_ids, rows_see_image=rows_see_image)

    def forward(
        self,
        tokens: Tensor,
        cross_attention_mask: Tensor,
        aspect_ratio_mask: Tensor,
        pixel_values: Tensor | None = None,
        aspect_ratio_ids: Tensor | None = None,
        labels: Tensor | None = None,
    ):
        """Run this stage on one micro-batch (full-length tensors; each rank takes its share).

        Args:
            tokens: ``[B, S]`` token ids.
            cross_attention_mask: ``[B, S, N, T]`` 1 where a token may see a tile (HF convention).
            aspect_ratio_mask: ``[B, N, T]`` 1 for real tiles.
            pixel_values: ``[B, N, T, C, H, W]`` (first stage only).
            aspect_ratio_ids: ``[B, N]`` (first stage only).
            labels: ``[B, S]`` next-token targets (last stage).

        Returns:
            Non-last stages: ``[text; X]`` for the next stage. Last stage: ``(loss [B, S_local],
            correct [B, S_local])`` with labels (``correct``: the target is the arg-max), else
            vocabulary-parallel logits ``[B, S_local, V / tp]``.
        """
        cp = self.pg_collection.cp
        seq_length, num_images = tokens.shape[1], cross_attention_mask.shape[2]
        text = text_range(seq_length, cp.size(), cp.rank())
        images = image_range(num_images, cp.size(), cp.rank())
        mask = self._cross_attention_mask(cross_attention_mask, aspect_ratio_mask, text, images)
        if self.pre_process:
            hidden = self.embedding(input_ids=tokens[:, text[0] : text[1]], position_ids=None)
            x = self.encode_images(
                pixel_values[:, images[0] : images[1]],
                aspect_ratio_ids[:, images[0] : images[1]],
                aspect_ratio_mask[:, images[0] : images[1]],
            )
        else:
            rows = self.local_text_rows(seq_length)
            hidden, x = self.input_tensor[:rows], self.input_tensor[rows:]
            self.decoder.set_input_tensor(hidden)
            hidden = None
        rope = self.rotary.get_emb(seq_length)[text[0] : text[1]]
        hidden = self.decoder(
            hidden_states=hidden, attention_mask=None, context=x, context_mask=mask, rotary_pos_emb=rope
        )
        if not self.post_process:
            return torch.cat([hidden, x.to(hidden.dtype)], dim=0)
        logits, _ = self.output_layer(hidden)  # [S_local, B, V / tp]
        if labels is None:
            return logits.transpose(0, 1)
        targets = labels[:, text[0] : text[1]].transpose(0, 1).contiguous()
        loss = tensor_parallel.vocab_parallel_cross_entropy(logits.float(), targets)
        with torch.no_grad():
            correct = self._target_is_argmax(logits, targets)
        return loss.transpose(0, 1), correct.transpose(0, 1)

    def _target_is_argmax(self, logits: Tensor, targets: Tensor) -> Tensor:
        """``[S, B]`` bool: the target's logit is the largest over the whole (TP-split) vocabulary."""
        tp = self.pg_collection.tp
        part = logits.shape[-1]
        start = tp.rank() * part
        local = targets - start
        mine = (local >= 0) & (local < part)
        target_logit = logits.gather(-1, local.clamp(0, part - 1).unsqueeze(-1)).squeeze(-1).float() * mine
        best = logits.max(dim=-1).values.float()
        if tp.size() > 1:
            torch.distributed.all_reduce(target_logit, group=tp)
            torch.distributed.all_reduce(best, op=torch.distributed.ReduceOp.MAX, group=tp)
        return target_logit >= best
