"""Tiny models of the three families, prompts about generated clips, and gloo workers that generate."""

import warnings

import torch
from train_harness import TINY

warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex|absl).*")

CONFIGS = {
    "mllama": TINY,
    "openflamingo": TINY.parent / "tiny-openflamingo.yaml",
    "mplug_owl3": TINY.parent / "tiny-mplug-owl3.yaml",
}
NEW_TOKENS = 6
# Open gates (mllama's vision gates too): the answer depends on every cross-attention weight.
OVERRIDES = {"model.cross_attention.gate_init": 0.5, "model.text.init_method_std": 0.3}


def tiny_model(arch: str, cp: int, tp: int = 1):
    """The tiny config's model of ``arch`` in a TP x CP layout (the same weights in every layout)."""
    from lvx_megatron.training.config import load_config
    from lvx_megatron.training.data import make_tokenizer
    from lvx_megatron.training.setup import build_model, init_model_parallel

    overrides = {
        **OVERRIDES,
        "parallel.context_parallel_size": cp,
        "parallel.tensor_model_parallel_size": tp,
        "parallel.sequence_parallel": False,
    }
    cfg = load_config(CONFIGS[arch], overrides)
    tokenizer = make_tokenizer(cfg)
    _, model = build_model(cfg, tokenizer.vocab_size, init_model_parallel(cfg), torch.device("cpu"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith("vision_model.") and name.rsplit(".", 1)[-1].startswith("gate"):
                p.fill_(0.5)
    return cfg, tokenizer, model.eval()


def samples(cfg, count: int, seed: int) -> list[dict]:
    """Held-out clips of the generated video QA set with their questions (of different lengths)."""
    from lvx_megatron.data.video_qa import VideoQAGenerator

    gen = VideoQAGenerator(count + seed, cfg.data.max_images, cfg.data.frame_size, seed=seed, split="eval")
    return [{"frames": gen[i]["frames"], "question": gen[i]["question"]} for i in range(seed, seed + count)]


def recompute_greedy(model, tokens: torch.Tensor, images: dict, steps: int) -> list[int]:
    """Greedy tokens of one unpadded prompt without any cache: the whole forward again at every step."""
    tokens, images = tokens.clone(), dict(images)
    out = []
    with torch.no_grad():
        for _ in range(steps):
            logits = model(tokens=tokens, **images)  # [1, S, V]
            best = int(logits[0, -1, : model.text.vocab_size].argmax())
            out.append(best)
            tokens = torch.cat([tokens, torch.tensor([[best]])], dim=1)
            if "cross_attention_mask" in images:  # a new token sees what the last one saw (HF's generate)
                xmask = images["cross_attention_mask"]
                images["cross_attention_mask"] = torch.cat([xmask, xmask[:, -1:]], dim=1)
    return out


def cached_and_recomputed(rank: int, world_size: int, count: int) -> dict:
    """Worker (one process): per family, KV-cached greedy tokens of ``count`` left-padded prompts, and
    each prompt's full-recompute greedy tokens."""
    from megatron.core import parallel_state as ps

    from lvx_megatron.core.cpu_compat import enable_cpu_compat
    from lvx_megatron.generation import build_prompts, generate

    enable_cpu_compat()
    results = {}
    for arch in CONFIGS:
        cfg, tokenizer, model = tiny_model(arch, cp=1)
        clips = samples(cfg, count, seed=3)
        batch = build_prompts(cfg, tokenizer, clips)
        cached = generate(model, batch.tokens, batch.images, NEW_TOKENS, prompt_mask=batch.prompt_mask)
        recomputed = []
        for clip in clips:
            one = build_prompts(cfg, tokenizer, [clip])
            recomputed.append(recompute_greedy(model, one.tokens, one.images, NEW_TOKENS))
        results[arch] = {"cached": cached, "recomputed": recomputed, "lengths": batch.prompt_mask.sum(1).tolist()}
        ps.destroy_model_parallel()
    return results


def cached_under_cp(rank: int, world_size: int, count: int, tp: int = 1) -> dict:
    """Worker: per family, KV-cached greedy tokens with CP = world_size / tp."""
    from megatron.core import parallel_state as ps

    from lvx_megatron.core.cpu_compat import enable_cpu_compat
    from lvx_megatron.generation import build_prompts, generate

    enable_cpu_compat()
    results = {}
    for arch in CONFIGS:
        cfg, tokenizer, model = tiny_model(arch, cp=world_size // tp, tp=tp)
        batch = build_prompts(cfg, tokenizer, samples(cfg, count, seed=3))
        results[arch] = generate(model, batch.tokens, batch.images, NEW_TOKENS, prompt_mask=batch.prompt_mask)
        ps.destroy_model_parallel()
    return results
