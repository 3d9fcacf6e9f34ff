"""Samples -> the model's micro-batch (Mllama / Llama-3.2-Vision conventions), and answer scoring."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from lvx_megatron.data.checks import check_positive
from lvx_megatron.data.tiling import cross_attention_token_mask, tile_images
from lvx_megatron.data.tokenizer import Tokenizer


def encode_sample(question: str, answer: str, num_images: int, tokenizer: Tokenizer) -> tuple[list[int], int]:
    """Token ids ``<|image|> * num_images, bos, question, answer, eos`` and the prompt length.

    The image tokens come first, before bos, as HF's ``build_string_from_input`` places them.
    """
    prompt = [tokenizer.image_id] * num_images + [tokenizer.bos_id] + tokenizer.encode(question)
    target = [*tokenizer.encode(answer), tokenizer.eos_id]
    return prompt + target, len(prompt)


def collate(
    samples: Sequence[dict],
    tokenizer: Tokenizer,
    seq_length: int,
    max_images: int,
    max_num_tiles: int,
    tile_size: int,
    question_types: Sequence[str] = (),
) -> dict[str, torch.Tensor]:
    """Build the micro-batch dict of ``samples`` (each ``{"frames": uint8 [F,H,W,3], "question", "answer"}``).

    Shapes are fixed by the arguments (B = len(samples), S = seq_length, N = max_images, T = max_num_tiles) so
    every micro-batch has the same shapes:

    * ``tokens`` int64 [B, S]: ``<|image|>*F, bos, question, answer, eos``, then ``pad_id``
    * ``labels`` int64 [B, S]: ``labels[t] = tokens[t+1]``; 0 after the last real token
    * ``loss_mask`` float32 [B, S]: 1 where ``labels[t]`` is an answer token or the final eos
    * ``pixel_values`` float32 [B, N, T, 3, tile, tile]: normalized tiles, zeros for padding tiles/images
    * ``aspect_ratio_ids`` int64 [B, N]: 1-based HF aspect-ratio id, 0 for padding images
    * ``aspect_ratio_mask`` int64 [B, N, T]: 1 for real tiles; tile 0 is 1 for padding images too (HF)
    * ``cross_attention_mask`` int64 [B, S, N, T]: 1 where token s sees tile t of image n, computed by HF's rule
      on the right-padded row (so pad positions after the last image group see it too, as in HF)
    * ``image_positions`` int64 [B, N]: the token index of image n's ``<|image|>`` token, -1 for padding images
      (OpenFlamingo's and mPLUG-Owl3's masks and mPLUG-Owl3's MI-Rope follow the image tokens)
    * ``question_type`` int64 [B]: the index of the sample's ``"qtype"`` in ``question_types``, -1 without one
    """
    if not samples:
        raise ValueError("samples must be a non-empty list")
    check_positive(seq_length=seq_length, max_images=max_images, max_num_tiles=max_num_tiles, tile_size=tile_size)
    b, s, n, t = len(samples), seq_length, max_images, max_num_tiles
    tokens = torch.full((b, s), tokenizer.pad_id, dtype=torch.int64)
    labels = torch.zeros((b, s), dtype=torch.int64)
    loss_mask = torch.zeros((b, s), dtype=torch.float32)
    pixel_values = torch.zeros((b, n, t, 3, tile_size, tile_size), dtype=torch.float32)
    aspect_ratio_ids = torch.zeros((b, n), dtype=torch.int64)
    aspect_ratio_mask = torch.zeros((b, n, t), dtype=torch.int64)
    aspect_ratio_mask[:, :, 0] = 1  # HF marks tile 0 of every image slot, padding images included
    cross_attention_mask = torch.zeros((b, s, n, t), dtype=torch.int64)
    image_positions = torch.full((b, n), -1, dtype=torch.int64)
    question_type = torch.tensor(
        [list(question_types).index(s["qtype"]) if s.get("qtype") in question_types else -1 for s in samples],
        dtype=torch.int64,
    )

    for i, sample in enumerate(samples):
        for key in ("frames", "question", "answer"):
            if key not in sample:
                raise ValueError(f"sample {i} lacks field {key!r} (needs 'frames', 'question', 'answer')")
        frames = np.asarray(sample["frames"])
        if frames.ndim == 3:  # a single image
            frames = frames[None]
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
            raise ValueError(f"sample {i}: frames must be uint8 [F, H, W, 3], got {frames.dtype} {frames.shape}")
        num_frames = frames.shape[0]
        if num_frames > max_images:
            raise ValueError(f"sample {i} has {num_frames} frames but max_images is {max_images}")
        ids, prompt_len = encode_sample(sample["question"], sample["answer"], num_frames, tokenizer)
        if len(ids) > seq_length:
            raise ValueError(f"sample {i} needs {len(ids)} tokens but seq_length is {seq_length}")
        length = len(ids)
        tokens[i, :length] = torch.tensor(ids, dtype=torch.int64)
        image_positions[i, :num_frames] = torch.tensor([p for p, tok in enumerate(ids) if tok == tokenizer.image_id])
        labels[i, : length - 1] = tokens[i, 1:length]
        # Position t predicts tokens[t+1]: train from the last prompt token up to the one before eos.
        loss_mask[i, prompt_len - 1 : length - 1] = 1.0

        tiles, ar_id = tile_images(frames, tile_size, max_num_tiles)  # frames of a clip share their size
        used = tiles.shape[1]
        pixel_values[i, :num_frames, :used] = tiles
        aspect_ratio_ids[i, :num_frames] = ar_id
        aspect_ratio_mask[i, :num_frames, :used] = 1
        # On the right-padded row, as HF's processor does with padding: the last image group is seen until the
        # end of the row, pad positions included (they carry no loss).
        cross_attention_mask[i] = cross_attention_token_mask(
            tokens[i].tolist(), tokenizer.image_id, tile_mask=_real_tiles(num_frames, used, n, t)
        )

    return {
        "tokens": tokens,
        "labels": labels,
        "loss_mask": loss_mask,
        "pixel_values": pixel_values,
        "aspect_ratio_ids": aspect_ratio_ids,
        "aspect_ratio_mask": aspect_ratio_mask,
        "cross_attention_mask": cross_attention_mask,
        "image_positions": image_positions,
        "question_type": question_type,
    }


def _real_tiles(num_images: int, used: int, max_images: int, max_num_tiles: int) -> torch.Tensor:
    # Unlike aspect_ratio_mask, padding images get no tile here: nothing may attend to them.
    m = torch.zeros(max_images, max_num_tiles, dtype=torch.int64)
    m[:num_images, :used] = 1
    return m


def answer_accuracy(logits_argmax: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor) -> tuple[int, int]:
    """(num_correct, num_samples): a sample is correct when every loss-masked target is predicted.

    Samples without any loss-masked position are not counted.
    """
    if logits_argmax.shape != labels.shape or labels.shape != loss_mask.shape:
        raise ValueError(
            f"logits_argmax {tuple(logits_argmax.shape)}, labels {tuple(labels.shape)} and loss_mask "
            f"{tuple(loss_mask.shape)} must have the same [B, S] shape"
        )
    m = loss_mask > 0
    wrong = ((logits_argmax != labels) & m).any(dim=-1)
    counted = m.any(dim=-1)
    return int((counted & ~wrong).sum()), int(counted.sum())
