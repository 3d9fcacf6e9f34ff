"""Prompts as the training data builds them (``data/batch.py``): ``<|image|>`` per frame, bos, the
question; several left-padded to one length for a batched generation."""

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ..data.batch import collate, encode_sample
from ..data.tokenizer import Tokenizer
from ..training.config import RunConfig
from ..training.families import family

# Batch keys that are not image inputs of a family's model.
TEXT_KEYS = ("tokens", "labels")


@dataclass
class PromptBatch:
    """What :func:`~.loop.generate` takes: ``tokens [B, S]`` (left-padded), ``prompt_mask [B, S]``
    (False at padding) and the family's image inputs ``images``."""

    tokens: Tensor
    prompt_mask: Tensor
    images: dict[str, Tensor]


def _left_pad(t: Tensor, pad: int, value: int) -> Tensor:
    """``t`` ``[1, S, ...]`` with ``pad`` rows of ``value`` before its sequence dimension's first."""
    return torch.cat([t.new_full((1, pad, *t.shape[2:]), value), t], dim=1)


def _drop_positions(batch: dict[str, Tensor], start: int, count: int) -> dict[str, Tensor]:
    """``batch`` (one collated sample) without its text positions ``start .. start + count - 1``; the images
    and their tokens come before ``start``, so what they are and which rows see them stay."""
    keep = torch.cat([torch.arange(start), torch.arange(start + count, batch["tokens"].shape[1])])
    return {**batch, "tokens": batch["tokens"][:, keep], "cross_attention_mask": batch["cross_attention_mask"][:, keep]}


def build_prompts(
    cfg: RunConfig, tokenizer: Tokenizer, samples: Sequence[dict], max_length: int | None = None
) -> PromptBatch:
    """Prompts of ``samples`` (each ``{"frames": uint8 [F, H, W, 3], "question": str}``) for the run's model.

    Each prompt is built as the training collator builds a sample (the same mask and image rules, at
    most ``data.max_images`` frames), then left-padded to the longest. With ``max_length``, a longer
    prompt loses the start of its question (its image tokens and bos stay): it is ``max_length`` tokens;
    ValueError naming ``max_length`` when that leaves no question token.
    """
    if not samples:
        raise ValueError("samples must be a non-empty list")
    d, v = cfg.data, cfg.model.vision
    rows = []
    for sample in samples:
        frames = np.asarray(sample["frames"])
        num_frames = 1 if frames.ndim == 3 else frames.shape[0]
        ids, length = encode_sample(sample["question"], "", num_frames, tokenizer)
        batch = collate([{**sample, "answer": ""}], tokenizer, len(ids), d.max_images, v.max_num_tiles, v.image_size)
        if max_length is not None and length > max_length:
            if max_length <= num_frames + 1:
                raise ValueError(
                    f"max_length {max_length} leaves no question token after the {num_frames} image tokens and bos"
                )
            batch, length = _drop_positions(batch, num_frames + 1, length - max_length), max_length
        rows.append((batch, length))
    longest = max(length for _, length in rows)
    keys = [k for k in family(cfg).model_inputs if k not in TEXT_KEYS]
    tokens, masks, images = [], [], {k: [] for k in keys}
    for batch, length in rows:
        pad = longest - length
        tokens.append(_left_pad(batch["tokens"][:, :length], pad, tokenizer.pad_id))
        masks.append(torch.arange(longest) >= pad)
        for k in keys:
            t = batch[k]
            if k == "cross_attention_mask":  # per text row: padding rows see nothing
                t = _left_pad(t[:, :length], pad, 0)
            elif k == "image_positions":  # token indices move with the padding
                t = torch.where(t >= 0, t + pad, t)
            images[k].append(t)
    return PromptBatch(torch.cat(tokens), torch.stack(masks), {k: torch.cat(ts) for k, ts in images.items()})


def answer_text(tokenizer: Tokenizer, ids: Sequence[int]) -> str:
    """The text of generated ``ids``, without the final eos."""
    ids = list(ids)
    if ids and ids[-1] == tokenizer.eos_id:
        ids = ids[:-1]
    return tokenizer.decode(ids)
