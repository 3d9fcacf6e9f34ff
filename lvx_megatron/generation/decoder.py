"""Prefill and decode steps of a :class:`~lvx_megatron.models.vlm.VisionLanguageModel` with caches.

During generation the text is replicated on every CP rank (a prompt is short, a decode step one
token per sequence), while each CP rank keeps only its visual shard, as in training:

* the text self-attention keeps megatron's own KV cache (``StaticInferenceContext``, passed as
  ``inference_context`` through ``TransformerBlock.forward``; megatron slices the full-length RoPE
  table for the new rows and switches to ``no_mask`` after the prefill);
* each cross-attention layer projects its CP rank's visual shard to K/V once, at prefill, keeps them
  on the context (:class:`~lvx_megatron.core.inference_context.CrossAttentionInferenceContext`) and
  attends every step's text rows to them through the ops API. Every rank's query block is then the
  same rows, so whatever strategy runs, each rank gets the exact attention against all shards;
* the vision side runs once, at prefill.
"""

import torch
from megatron.core.tensor_parallel.mappings import gather_from_tensor_model_parallel_region
from torch import Tensor

from ..core.context_mask import CrossAttentionMask
from ..core.inference_context import CrossAttentionInferenceContext
from ..models.vlm import ImageBatch, VisionLanguageModel


def check_generation_model(model: VisionLanguageModel) -> None:
    """ValueError naming the setting when ``model`` cannot generate (whole model on one stage, no SP)."""
    if model.pg_collection.pp.size() > 1:
        raise ValueError(
            "parallel.pipeline_model_parallel_size must be 1 for generation, got "
            f"{model.pg_collection.pp.size()} (any checkpoint loads into pipeline size 1)"
        )
    if model.config.sequence_parallel:
        raise ValueError("parallel.sequence_parallel must be false for generation (a decode step has one row)")


def text_attention_mask(real: Tensor | None, rows: int) -> Tensor | None:
    """megatron's self-attention mask (True: masked) ``[B, 1, rows, L]`` of the newest ``rows`` text
    positions against all ``L`` so far: padding keys are masked, but a padding row sees itself (a row
    with no key would be NaN, and its value would reach the others as ``0 * NaN``). None: no padding."""
    if real is None:
        return None
    length = real.shape[1]
    masked = ~real[:, None, None, :].expand(-1, 1, rows, length)
    own = torch.arange(length - rows, length, device=real.device)[:, None] == torch.arange(length, device=real.device)
    return masked & ~own


class CachedDecoder:
    """One batch of prompts on ``model``: :meth:`prefill` once, then :meth:`decode` per new token.

    Args:
        model: the whole model on this rank's one pipeline stage (TP/CP groups as built).
        batch: this CP rank's images (``model.image_batch``).
        prompt_mask: ``[B, S]`` bool, False at left padding (the batch and prompt sizes).
        max_new_tokens: how many tokens may follow the prompt (sizes megatron's KV cache).
    """

    def __init__(self, model: VisionLanguageModel, batch: ImageBatch, prompt_mask: Tensor, max_new_tokens: int) -> None:
        check_generation_model(model)
        self.model, self.batch = model, batch
        batch_size, self.prompt_length = prompt_mask.shape
        length = self.prompt_length + max_new_tokens
        self.context = CrossAttentionInferenceContext(batch_size, length)
        # megatron slices this table itself: rows [offset, offset + new) for q, [0, offset + new) for k.
        self.rope = model.rotary.get_emb(length).to(prompt_mask.device)
        self.real = None if bool(prompt_mask.all()) else prompt_mask
        self.decode_mask: CrossAttentionMask | None = None

    def _mask(self, rows: tuple[int, int]) -> CrossAttentionMask:
        """The family's cross-attention mask of text ``rows`` (replicated on every CP rank), planned."""
        return self.model.cross_attention_mask(self.batch, rows).planned(self.model.pg_collection.cp, rows[1] - rows[0])

    def _step(self, tokens: Tensor, context: Tensor | None, mask: CrossAttentionMask) -> Tensor:
        """Run ``tokens [B, s]`` (the next ``s`` positions) through the decoder; the last row's logits over the
        whole (padded) vocabulary."""
        model = self.model
        hidden = model.embedding(input_ids=tokens, position_ids=None)
        hidden = model.decoder(
            hidden_states=hidden,
            attention_mask=text_attention_mask(self.real, tokens.shape[1]),
            context=context,
            context_mask=mask,
            rotary_pos_emb=self.rope,
            inference_context=self.context,
        )
        self.context.increment_sequence_len_offset(tokens.shape[1])
        logits, _ = model.output_layer(hidden[-1:])  # [1, B, V / tp]
        logits = gather_from_tensor_model_parallel_region(logits, group=model.pg_collection.tp)
        return logits[0].float()

    def prefill(self, tokens: Tensor) -> Tensor:
        """Encode the images and the prompt ``[B, S]``; the logits ``[B, V_padded]`` of the first new token."""
        s = self.prompt_length
        if tokens.shape[1] != s:
            raise ValueError(f"tokens must have the prompt length {s}, got {tuple(tokens.shape)}")
        x = self.model.encode_images(self.batch)
        context = self.model.decoder_context(x, self.batch, s)
        logits = self._step(tokens, context, self._mask((0, s)))
        # Every later token sees what the family's mask gives the last prompt position.
        self.decode_mask = self._mask((s - 1, s))
        self.context.enable_decode_mode()
        return logits

    def decode(self, tokens: Tensor) -> Tensor:
        """Append one token per sequence (``[B]``); the logits ``[B, V_padded]`` of the next."""
        if self.decode_mask is None:
            raise ValueError("decode() runs after prefill()")
        if self.real is not None:
            self.real = torch.cat([self.real, self.real.new_ones(self.real.shape[0], 1)], dim=1)
        return self._step(tokens.view(-1, 1), None, self.decode_mask)
