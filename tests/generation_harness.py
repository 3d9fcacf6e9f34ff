"""Tiny models of the three families, prompts about generated clips, and gloo workers that generate."""

import warnings

import pytest
import torch
from train_harness import TINY, run_configs, small_run

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
    """Worker (one process): per family, KV-cached greedy tokens of ``count`` left-padded prompts, the
    same with the frames blanked, tokens drawn with temperature and top-p, and each prompt's
    full-recompute greedy tokens."""
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
        blank = {**batch.images, "pixel_values": torch.zeros_like(batch.images["pixel_values"])}
        blanked = generate(model, batch.tokens, blank, NEW_TOKENS, prompt_mask=batch.prompt_mask)
        recomputed = []
        for clip in clips:
            one = build_prompts(cfg, tokenizer, [clip])
            recomputed.append(recompute_greedy(model, one.tokens, one.images, NEW_TOKENS))
        results[arch] = {
            "cached": cached,
            "blanked": blanked,
            "sampled": sampled(model, batch),
            "recomputed": recomputed,
            "lengths": batch.prompt_mask.sum(1).tolist(),
        }
        ps.destroy_model_parallel()
    return results


def cached_in_layouts(rank: int, world_size: int, count: int, layouts: list[tuple[int, int]]) -> dict:
    """Worker: per (TP, CP) layout and family, KV-cached greedy and sampled tokens (each rank's)."""
    from megatron.core import parallel_state as ps

    from lvx_megatron.core.cpu_compat import enable_cpu_compat
    from lvx_megatron.generation import build_prompts, generate

    enable_cpu_compat()
    results = {"replicated queries": replicated_query_errors(rank, world_size)}
    for tp, cp in layouts:
        for arch in CONFIGS:
            cfg, tokenizer, model = tiny_model(arch, cp=cp, tp=tp)
            batch = build_prompts(cfg, tokenizer, samples(cfg, count, seed=3))
            greedy = generate(model, batch.tokens, batch.images, NEW_TOKENS, prompt_mask=batch.prompt_mask)
            results[(tp, cp, arch)] = {"cached": greedy, "sampled": sampled(model, batch)}
            ps.destroy_model_parallel()
    return results


def sampled(model, batch) -> list[list[int]]:
    """Tokens drawn with temperature and top-p (seeded)."""
    from lvx_megatron.generation import Sampling, generate

    sampling = Sampling(temperature=1.0, top_p=0.9, seed=7)
    return generate(model, batch.tokens, batch.images, NEW_TOKENS, sampling, prompt_mask=batch.prompt_mask)


HF_EOS = 2  # hf_harness.hf_config's eos_token_id
HF_IMAGE_KEYS = ("cross_attention_mask", "aspect_ratio_mask", "pixel_values", "aspect_ratio_ids")


def hf_prompts() -> list[dict]:
    """Single prompts from the HF harness's inputs: text before the first of two images with 2 and 4
    tiles, and one image beside a padding image slot (its right padding cropped), for two seeds."""
    from hf_harness import make_inputs

    prompts = []
    for seed in (0, 1):
        inputs = make_inputs(seed)
        for sample in (0, 1):
            length = int(inputs["attention_mask"][sample].sum())
            one = {k: v[sample : sample + 1] for k, v in inputs.items()}
            for key in ("input_ids", "attention_mask", "cross_attention_mask"):
                one[key] = one[key][:, :length]
            prompts.append(one)
    return prompts


def ours_on_hf_checkpoint(rank: int, world_size: int, ckpt: str, prompts: list[dict], steps: int) -> list[list[int]]:
    """Worker: our greedy tokens of each prompt from the imported checkpoint, CP = world_size."""
    from pathlib import Path

    from megatron.core import parallel_state as ps

    from lvx_megatron.generation import generate
    from lvx_megatron.hf.forward import load_model

    model, vocab = load_model(Path(ckpt), 1, 1, world_size)
    out = []
    for p in prompts:
        images = {k: p[k] for k in HF_IMAGE_KEYS}
        out += generate(model, p["input_ids"], images, steps, eos_id=HF_EOS, vocab_size=vocab)
    ps.destroy_model_parallel()
    return out


def train_and_answer(rank: int, world_size: int, data: str, run: str, clip: str, question: str) -> str:
    """Worker: a short run of ``pretrain_mllm.py``'s trainer on the tiny config saving a checkpoint,
    then the Python API's greedy answer about ``clip`` from that checkpoint."""
    from megatron.core import parallel_state as ps

    from lvx_megatron.data.video import decode_clip
    from lvx_megatron.generation import answer_text, build_prompts, generate, load_for_generation

    overrides = small_run(data, run, **TOOL_RUN, **{"checkpoint.save": run})
    run_configs(rank, world_size, [(TINY, overrides)])
    ps.destroy_model_parallel()
    loaded = load_for_generation(run)
    frames = decode_clip(clip, loaded.cfg.data.max_images)
    batch = build_prompts(loaded.cfg, loaded.tokenizer, [{"frames": frames, "question": question}])
    ids = generate(loaded.model, batch.tokens, batch.images, TOOL_TOKENS, eos_id=loaded.tokenizer.eos_id)
    ps.destroy_model_parallel()
    return answer_text(loaded.tokenizer, ids[0])


# Two steps from a wide random start at a small learning rate: the answer is not just eos.
TOOL_RUN = {
    "training.train_iters": 2,
    "training.lr": 1e-4,
    "training.min_lr": 0.0,
    "training.eval_without_vision": False,
    "model.text.init_method_std": 0.3,
}
TOOL_TOKENS = 5


def replicated_query_errors(rank: int, world_size: int) -> dict[tuple[str, int], float]:
    """Worker: per flat ops strategy and query rows (a prompt, one decode row), the largest error of
    each rank's output when every rank passes the same queries against its own visual shard (one rank
    holds none), against float64 attention to all shards at once."""
    import torch.distributed as dist

    from lvx_megatron.ops import distributed_cross_attention
    from lvx_megatron.ops.registry import STRATEGIES

    gen = torch.Generator().manual_seed(11)
    b, hq, hkv, d, lengths = 2, 4, 2, 8, [7, 0, 5][:world_size]
    k = torch.randn(b, sum(lengths), hkv, d, generator=gen, dtype=torch.float64)
    v = torch.randn(b, sum(lengths), hkv, d, generator=gen, dtype=torch.float64)
    ids = torch.randint(0, 3, (b, sum(lengths)), generator=gen)
    start = sum(lengths[:rank])
    mine = slice(start, start + lengths[rank])
    errors = {}
    for rows in (6, 1):
        q = torch.randn(b, rows, hq, d, generator=gen, dtype=torch.float64)
        visible = torch.rand(b, rows, 3, generator=gen) < 0.6
        visible[0, 0] = False  # a row that sees nothing: exactly zero
        allowed = visible.gather(2, ids[:, None, :].expand(-1, rows, -1))  # [b, rows, S_kv]
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k.repeat_interleave(hq // hkv, 2)) * d**-0.5
        weights = torch.softmax(scores.masked_fill(~allowed[:, None], float("-inf")), -1).nan_to_num(0.0)
        reference = torch.einsum("bhqk,bkhd->bqhd", weights, v.repeat_interleave(hq // hkv, 2))
        for name in STRATEGIES:
            out = distributed_cross_attention(
                q, k[:, mine], v[:, mine], group=dist.group.WORLD, strategy=name, q_image_mask=visible,
                kv_image_ids=ids[:, mine],
            )  # fmt: skip
            errors[(name, rows)] = float((out - reference).abs().max())
    return errors


def parse_error(parse_args, argv: list[str], capsys) -> str:
    """What a tool's argparse prints for the bad command line ``argv`` (it must exit with status 2)."""
    with pytest.raises(SystemExit) as exit_:
        parse_args(argv)
    assert exit_.value.code == 2
    return capsys.readouterr().err
