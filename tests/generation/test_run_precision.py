"""A bf16 run generates in bf16: the whole model (the vision side too) in the run's dtype, the pixels cast to it."""

import pytest
import torch
from generation_harness import CONFIGS, samples

from lvx_megatron.launch import spawn_gloo


def bf16_prefill_against_forward(rank: int, world_size: int) -> dict:
    """Worker: per family, the bf16 prefill's next-token logits and the full forward's at the prompt's end."""
    from megatron.core import parallel_state as ps

    from lvx_megatron.core.cpu_compat import enable_cpu_compat
    from lvx_megatron.generation import CachedDecoder, build_prompts
    from lvx_megatron.generation.loading import in_run_precision
    from lvx_megatron.generation.loop import model_inputs_on
    from lvx_megatron.training.config import load_config
    from lvx_megatron.training.data import make_tokenizer
    from lvx_megatron.training.setup import build_model, init_model_parallel

    enable_cpu_compat()
    out = {}
    for arch, path in CONFIGS.items():
        cfg = load_config(path, {"training.precision": "bf16", "parallel.context_parallel_size": 1})
        tokenizer = make_tokenizer(cfg)
        _, model = build_model(cfg, tokenizer.vocab_size, init_model_parallel(cfg), torch.device("cpu"))
        model = in_run_precision(model).eval()
        prompt = build_prompts(cfg, tokenizer, samples(cfg, 1, seed=5))
        images = model_inputs_on(model, prompt.images)
        with torch.no_grad():
            decoder = CachedDecoder(model, model.image_batch(**images), prompt.prompt_mask, 1)
            cached = decoder.prefill(prompt.tokens)[0]
            full = model(tokens=prompt.tokens, **images)[0, -1].float()
        dtypes = {p.dtype for p in model.parameters()}
        out[arch] = {"cached": cached, "full": full, "dtypes": dtypes}
        ps.destroy_model_parallel()
    return out


@pytest.fixture(scope="module")
def logits() -> dict:
    return spawn_gloo(1, bf16_prefill_against_forward)[0]


@pytest.mark.parametrize("arch", list(CONFIGS))
def test_a_bf16_run_prefills_like_its_forward(logits, arch):
    got = logits[arch]
    assert got["dtypes"] == {torch.bfloat16}
    cached, full = got["cached"], got["full"]
    assert cached.shape == full.shape  # the padded vocabulary (TP 1)
    assert torch.isfinite(cached).all() and torch.isfinite(full).all()
    assert (cached - full).abs().max() <= 0.05 * full.abs().max()
