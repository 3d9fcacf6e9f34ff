"""The generation loop: prefill, then one decode step per new token until EOS or the token budget."""

from collections.abc import Callable

import torch
from torch import Tensor

from ..models.vlm import VisionLanguageModel
from .decoder import CachedDecoder
from .sampling import Sampling, agree, choose


def _check(tokens: Tensor, prompt_mask: Tensor | None, max_new_tokens: int) -> None:
    """ValueError naming the argument."""
    if not isinstance(tokens, Tensor) or tokens.dim() != 2 or tokens.dtype != torch.int64 or tokens.shape[1] == 0:
        got = f"{tokens.dtype} {tuple(tokens.shape)}" if isinstance(tokens, Tensor) else type(tokens).__name__
        raise ValueError(f"prompt_tokens must be an int64 tensor [B, S] with S >= 1, got {got}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    if prompt_mask is not None:
        if prompt_mask.shape != tokens.shape or prompt_mask.dtype != torch.bool:
            got = f"{prompt_mask.dtype} {tuple(prompt_mask.shape)}"
            raise ValueError(f"prompt_mask must be a bool tensor {tuple(tokens.shape)}, got {got}")
        if (prompt_mask[:, :-1] & ~prompt_mask[:, 1:]).any() or not prompt_mask[:, -1].all():
            raise ValueError("prompt_mask must mark left padding only (False before each prompt, then True)")


def model_inputs_on(model: VisionLanguageModel, inputs: dict[str, Tensor]) -> dict[str, Tensor]:
    """``inputs`` on the model's device, the floating ones (pixels) in its parameters' dtype, as
    megatron's ``Float16Module`` casts a bf16 model's inputs in training."""
    device, dtype = model.embedding.word_embeddings.weight.device, model.config.params_dtype
    return {k: v.to(device, dtype=dtype) if v.is_floating_point() else v.to(device) for k, v in inputs.items()}


@torch.no_grad()
def generate(
    model: VisionLanguageModel,
    prompt_tokens: Tensor,
    images: dict[str, Tensor],
    max_new_tokens: int,
    sampling: Sampling | None = None,
    eos_id: int | None = None,
    prompt_mask: Tensor | None = None,
    on_token: Callable[[list[list[int]]], None] | None = None,
    vocab_size: int | None = None,
) -> list[list[int]]:
    """Continue a batch of prompts about their images; collective over the model's TP x CP group.

    Args:
        model: any family's model, whole on this rank's stage (pipeline size 1), no sequence parallelism.
        prompt_tokens: ``[B, S]`` int64, the same on every rank; several prompts are left-padded to
            one length (``prompt_mask``).
        images: the family's image inputs (its ``model_inputs`` other than ``tokens`` and ``labels``,
            all images of the batch, the same on every rank; each CP rank encodes its share), in the
            coordinates of the padded ``prompt_tokens``.
        max_new_tokens: at most this many tokens per sequence.
        sampling: greedy (None), or temperature, top-p and seed.
        eos_id: a sequence ends after this token (None: only at ``max_new_tokens``).
        prompt_mask: ``[B, S]`` bool, False at left padding (None: none).
        on_token: called after every step with the tokens so far (for streaming).
        vocab_size: tokens at or beyond it are never chosen (default: the model's ``text.vocab_size``;
            an imported checkpoint's padded vocabulary is larger than the tokenizer's).

    Returns:
        Per sequence, its new tokens (ending with ``eos_id`` if it stopped there), the same on every rank.
    """
    _check(prompt_tokens, prompt_mask, max_new_tokens)
    sampling = sampling or Sampling()
    was_training = model.training
    model.eval()
    try:
        device = model.embedding.word_embeddings.weight.device
        tokens = prompt_tokens.to(device)
        b, s = tokens.shape
        batch = model.image_batch(**model_inputs_on(model, images))
        mask = torch.ones(b, s, dtype=torch.bool, device=device) if prompt_mask is None else prompt_mask.to(device)
        decoder = CachedDecoder(model, batch, mask, max_new_tokens)
        vocab = vocab_size or model.text.vocab_size  # the padded rows are no tokens
        generator = sampling.generator(device)
        logits = decoder.prefill(tokens)[:, :vocab]
        out: list[list[int]] = [[] for _ in range(b)]
        done = torch.zeros(b, dtype=torch.bool, device=device)
        for step in range(max_new_tokens):
            new = agree(choose(logits, sampling, generator), model.pg_collection)
            for i, token in enumerate(new.tolist()):
                if not done[i]:
                    out[i].append(token)
            if eos_id is not None:
                done |= new == eos_id
            if on_token is not None:
                on_token(out)
            if bool(done.all()) or step == max_new_tokens - 1:
                break
            logits = decoder.decode(new)[:, :vocab]
        return out
    finally:
        model.train(was_training)
