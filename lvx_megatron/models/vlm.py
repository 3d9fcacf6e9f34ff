"""The text side shared by lvx-megatron's vision-language models, with context parallelism.

Each CP rank encodes only its share of the images (whole images, see :mod:`.sharding`) into its
visual shard ``X``; its text shard is a contiguous piece of the sequence. The decoder is
megatron's ``TransformerBlock`` built from :func:`~lvx_megatron.core.cross_attention_decoder_block_spec`
with the architecture's cross-attention layer spec; every cross-attention layer reads ``X`` through
the context-parallel ops. A subclass supplies the vision side (:meth:`encode_images`), the
cross-attention mask and the layer spec.

Pipeline parallelism: the vision side lives on the first stage. Every later stage needs ``X`` too,
so a stage sends ``[text hidden states; X]`` concatenated along the sequence
(``pipeline_tensor_shape`` gives megatron's schedule that shape) and the next stage splits them;
``dX`` flows back the same way into the vision side. ``X`` narrower or wider than the text is
packed into rows of the text width (zero-padded), so one stage tensor carries both.
"""

from dataclasses import dataclass

import torch
from megatron.core import tensor_parallel
from megatron.core.models.common.embeddings.language_model_embedding import LanguageModelEmbedding
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlock
from torch import Tensor

from ..core import CrossAttentionMask, CrossAttentionTransformerConfig, cross_attention_decoder_block_spec
from .sharding import image_range, text_range


@dataclass
class TextSettings:
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


@dataclass(frozen=True)
class StageParts:
    """What every family's model of one pipeline stage is built from, besides its vision side.

    Attributes:
        config: the decoder config (``visual_hidden_size``: the width of ``X``).
        text: vocabulary and RoPE settings.
        pg: process groups (``tp``, ``cp``, ``pp``).
        pre_process / post_process: first / last pipeline stage.
        freeze_vision_encoder: keep the vision encoder's weights fixed (a projector still trains).
        vision_activation_checkpointing: recompute each vision layer in backward (long videos).
    """

    config: CrossAttentionTransformerConfig
    text: TextSettings
    pg: ProcessGroupCollection
    pre_process: bool = True
    post_process: bool = True
    freeze_vision_encoder: bool = False
    vision_activation_checkpointing: bool = False


@dataclass
class ImageBatch:
    """This rank's share of a micro-batch's images; a family's subclass adds its own inputs.

    ``images``: ``(start, stop)`` of this rank's images among the sample's ``N`` (whole images, see
    :mod:`.sharding`); ``pixel_values [B, n, T, C, H, W]``: this rank's ``n`` images (first stage only).
    """

    images: tuple[int, int]
    pixel_values: Tensor | None


class VisionLanguageModel(MegatronModule):
    """Embedding, vision side (first stage), cross-attention decoder, LM head (last stage).

    Args:
        parts: the decoder config, text settings, process groups and pipeline stage.
        cross_attention_spec: the layer spec of the layers at ``config.cross_attention_layers``.
    """

    def __init__(self, parts: StageParts, cross_attention_spec: ModuleSpec) -> None:
        config, text, pg_collection = parts.config, parts.text, parts.pg
        pre_process, post_process = parts.pre_process, parts.post_process
        super().__init__(config=config)
        tp = pg_collection.tp.size()
        if text.padded_vocab_size % tp:
            raise ValueError(
                f"the padded vocabulary ({text.padded_vocab_size}) must be divisible by the tensor-model-parallel "
                f"size ({tp}); choose make_vocab_size_divisible_by as a multiple of {tp}"
            )
        self.pg_collection = pg_collection
        self.text = text
        self.pre_process, self.post_process = pre_process, post_process
        self.model_type = None  # set by the training glue (megatron's ModelType)
        self.share_embeddings_and_output_weights = False  # read by finalize_model_grads (untied head)
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
        self.decoder = TransformerBlock(
            config,
            spec=cross_attention_decoder_block_spec(
                config, pp_rank=pg_collection.pp.rank(), cross_attention_spec=cross_attention_spec
            ),
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

    # --- what an architecture supplies --------------------------------------------------------

    def visual_tokens_per_image(self, num_tiles: int) -> int:
        """Rows of ``X`` one image contributes."""
        raise NotImplementedError

    def encode_images(self, batch: ImageBatch) -> Tensor:
        """This rank's images -> visual shard ``X`` ``[n * visual_tokens_per_image, B, visual_hidden_size]``."""
        raise NotImplementedError

    def cross_attention_mask(self, batch: ImageBatch, text: tuple[int, int]) -> CrossAttentionMask:
        """This rank's mask: its text rows ``text`` against its visual tokens."""
        raise NotImplementedError

    def image_batch(self, **inputs: Tensor) -> ImageBatch:
        """This CP rank's share of the images, from the family's batch inputs other than ``tokens``
        and ``labels`` (what its ``forward`` takes)."""
        raise NotImplementedError

    def decoder_context(self, x: Tensor, batch: ImageBatch, seq_length: int) -> Tensor:
        """What the cross-attention layers get as ``context`` (``X`` itself unless overridden)."""
        return x

    # --- pipeline plumbing -------------------------------------------------------------------

    def set_input_tensor(self, input_tensor) -> None:
        """megatron's schedules hand the received ``[text; X]`` tensor (in a list) to later stages."""
        self.input_tensor = input_tensor[0] if isinstance(input_tensor, list) else input_tensor

    def _rows_per_visual_token(self) -> int:
        return -(-self.config.visual_hidden_size // self.config.hidden_size)

    def local_text_rows(self, seq_length: int) -> int:
        """Text rows this rank holds between stages (divided by TP under sequence parallelism)."""
        rows = seq_length // self.pg_collection.cp.size()
        return rows // self.pg_collection.tp.size() if self.config.sequence_parallel else rows

    def pipeline_tensor_shape(self, seq_length: int, micro_batch_size: int, num_images: int, num_tiles: int):
        """The ``[text; X]`` shape this rank sends and receives between pipeline stages."""
        start, stop = self.local_images(num_images)
        visual = (stop - start) * self.visual_tokens_per_image(num_tiles) * self._rows_per_visual_token()
        return (self.local_text_rows(seq_length) + visual, micro_batch_size, self.config.hidden_size)

    def _pack_visual(self, x: Tensor, dtype: torch.dtype) -> Tensor:
        """``X [s, b, d_vis]`` -> ``[s * k, b, hidden]``, ``k = ceil(d_vis / hidden)`` (zero-padded)."""
        k, hidden = self._rows_per_visual_token(), self.config.hidden_size
        x = x.to(dtype)
        if x.shape[-1] == hidden:
            return x
        s, b, d = x.shape
        x = torch.nn.functional.pad(x, (0, k * hidden - d))
        return x.view(s, b, k, hidden).transpose(1, 2).reshape(s * k, b, hidden)

    def _unpack_visual(self, rows: Tensor) -> Tensor:
        """Inverse of :meth:`_pack_visual`."""
        k, hidden, d = self._rows_per_visual_token(), self.config.hidden_size, self.config.visual_hidden_size
        if d == hidden:
            return rows
        s, b = rows.shape[0] // k, rows.shape[1]
        return rows.view(s, k, b, hidden).transpose(1, 2).reshape(s, b, k * hidden)[..., :d]

    # --- forward -----------------------------------------------------------------------------

    def local_images(self, num_images: int) -> tuple[int, int]:
        """``(start, stop)`` of the images this CP rank encodes, of a sample's ``num_images``."""
        cp = self.pg_collection.cp
        return image_range(num_images, cp.size(), cp.rank())

    def run(self, tokens: Tensor, batch: ImageBatch, labels: Tensor | None = None):
        """Run this stage on one micro-batch (full-length ``tokens`` and ``labels``; each rank takes its
        share); a family's ``forward`` builds ``batch`` from its inputs.

        Args:
            tokens: ``[B, S]`` token ids.
            batch: this rank's images and what the family's mask and vision side need.
            labels: ``[B, S]`` next-token targets (last stage).

        Returns:
            Non-last stages: ``[text; X]`` for the next stage. Last stage: ``(loss [B, S_local],
            correct [B, S_local])`` with labels (``correct``: the target is the arg-max), else
            vocabulary-parallel logits ``[B, S_local, V / tp]``.
        """
        cp = self.pg_collection.cp
        seq_length = tokens.shape[1]
        text = text_range(seq_length, cp.size(), cp.rank())
        # One plan per micro-batch, shared by every cross-attention layer, forward and backward.
        mask = self.cross_attention_mask(batch, text).planned(cp, text[1] - text[0])
        if self.pre_process:
            hidden = self.embedding(input_ids=tokens[:, text[0] : text[1]], position_ids=None)
            x = self.encode_images(batch)
        else:
            rows = self.local_text_rows(seq_length)
            hidden, x = self.input_tensor[:rows], self._unpack_visual(self.input_tensor[rows:])
            self.decoder.set_input_tensor(hidden)
            hidden = None
        rope = self.rotary.get_emb(seq_length)[text[0] : text[1]]
        hidden = self.decoder(
            hidden_states=hidden,
            attention_mask=None,
            context=self.decoder_context(x, batch, seq_length),
            context_mask=mask,
            rotary_pos_emb=rope,
        )
        if not self.post_process:
            return torch.cat([hidden, self._pack_visual(x, hidden.dtype)], dim=0)
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
