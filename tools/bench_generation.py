"""Generation latency of a config's model on this GPU: prefill, decode per token, and the caches' memory.

    python tools/bench_generation.py --frames 32,128 --output benchmarks/results/generation_1b_h200.json

For the model of ``--config`` (default ``examples/configs/single-gpu-1b.yaml``: 1.2B parameters,
448x448 frames of 1,025 visual tokens) with random weights in the config's precision, one prompt
about ``F`` random frames for each ``--frames`` value, KV-cached greedy decoding
(:mod:`lvx_megatron.generation`), under ``torchrun`` with CP = the processes:

* ``prefill_ms``: the vision encoder over the frames, the visual K/V of every cross-attention layer
  and the prompt through the decoder (median of ``--iters`` generations);
* ``decode_ms``: one new token (median over every decode step of those generations);
* ``visual_kv_gib`` / ``text_kv_gib``: this rank's cached visual K/V (all cross-attention layers)
  and megatron's text KV cache (allocated for prompt + ``--new-tokens``); ``max_memory_gib``: the
  peak of a generation;
* the decode step's cross-attention alone (one query row against all ``F * 1,025`` keys, the
  shape and mask of the model's decode step: every frame visible), through the ops API beside
  torch's SDPA kernels at the same shape (``xattn_ours_us``, ``xattn_sdpa_us``, ``sdpa_kernel``:
  the fastest of flash, efficient and cuDNN that runs, ``ours_over_sdpa``: the time ratio; single
  GPU only).

Prints a table; ``--output`` writes a results file. Needs CUDA.
"""

import argparse
import os
import statistics
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from lvx_megatron.cuda_timing import median_cuda_ms
from lvx_megatron.results import rows_table, write_results

TABLE_COLUMNS = [
    ("frames", "d"),
    ("visual_tokens", "d"),
    ("cp", "d"),
    ("prefill_ms", ".1f"),
    ("decode_ms", ".2f"),
    ("visual_kv_gib", ".2f"),
    ("text_kv_gib", ".3f"),
    ("max_memory_gib", ".1f"),
    ("xattn_ours_us", ".1f"),
    ("xattn_sdpa_us", ".1f"),
    ("sdpa_kernel", ""),
    ("ours_over_sdpa", ".2f"),
]
ITERS, WARMUP = 50, 5  # timed and warm-up calls of the decode step's cross-attention
SDPA_KERNELS = {
    "flash": torch.nn.attention.SDPBackend.FLASH_ATTENTION,
    "efficient": torch.nn.attention.SDPBackend.EFFICIENT_ATTENTION,
    "cudnn": torch.nn.attention.SDPBackend.CUDNN_ATTENTION,
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from lvx_megatron.generation.cli import positive_int

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="examples/configs/single-gpu-1b.yaml")
    parser.add_argument("--frames", default="32,128", help="comma-separated frame counts (default: 32,128)")
    parser.add_argument("--new-tokens", type=positive_int("--new-tokens"), default=32)
    parser.add_argument("--iters", type=positive_int("--iters"), default=3, help="timed generations per row")
    parser.add_argument("--output", help="write a results file")
    args = parser.parse_args(argv)
    try:
        args.frames = [int(f) for f in args.frames.split(",")]
    except ValueError:
        parser.error(f"--frames must be comma-separated positive integers, got {args.frames!r}")
    if min(args.frames) < 1:
        parser.error(f"--frames must be comma-separated positive integers, got {args.frames}")
    return args


def synced_ms(fn) -> tuple[float, object]:
    """Milliseconds of ``fn()`` between device synchronisations, and its value."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    value = fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e3, value


def cache_gib(context) -> tuple[float, float]:
    """``(visual, text)`` GiB held by a generation's caches on this rank."""

    def gib(pairs) -> float:
        return sum(t.numel() * t.element_size() for pair in pairs for t in pair) / 2**30

    return gib(context.visual_key_value_dict.values()), gib(context.key_value_memory_dict.values())


def generation_row(model, cfg, tokenizer, frames: int, new_tokens: int, iters: int) -> dict:
    """Prefill and decode times of one prompt about ``frames`` random frames, and the caches' sizes."""
    from lvx_megatron.data.video_qa import VideoQAGenerator
    from lvx_megatron.generation import CachedDecoder, build_prompts
    from lvx_megatron.generation.loop import model_inputs_on

    size = cfg.data.frame_size
    question = VideoQAGenerator(1, 4, 16, seed=0, split="eval")[0]["question"]
    pixels = np.random.default_rng(0).integers(0, 256, (frames, size, size, 3), dtype=np.uint8)
    prompt = build_prompts(cfg, tokenizer, [{"frames": pixels, "question": question}])
    device = torch.device("cuda", torch.cuda.current_device())
    tokens = prompt.tokens.to(device)
    prefill, decode = [], []
    for _ in range(iters + 1):  # the first generation warms up (kernel choice, allocator)
        torch.cuda.reset_peak_memory_stats()
        with torch.no_grad():
            batch = model.image_batch(**model_inputs_on(model, prompt.images))
            decoder = CachedDecoder(model, batch, prompt.prompt_mask.to(device), new_tokens)
            ms, logits = synced_ms(lambda d=decoder: d.prefill(tokens))
            prefill.append(ms)
            for _ in range(new_tokens - 1):
                token = logits.argmax(-1)
                ms, logits = synced_ms(lambda d=decoder, t=token: d.decode(t))
                decode.append(ms)
    visual, text = cache_gib(decoder.context)
    cp = model.pg_collection.cp.size()
    return {
        "frames": frames,
        "visual_tokens": frames * model.visual_tokens_per_image(cfg.model.vision.max_num_tiles),
        "cp": cp,
        "prompt_tokens": tokens.shape[1],
        "new_tokens": new_tokens,
        "prefill_ms": statistics.median(prefill[1:]),
        "decode_ms": statistics.median(decode[new_tokens - 1 :]),
        "visual_kv_gib": visual,
        "text_kv_gib": text,
        "max_memory_gib": torch.cuda.max_memory_allocated() / 2**30,
    }


def decode_attention_us(cfg, visual_tokens: int) -> dict:
    """The decode step's cross-attention alone (one query row, every visual token visible): ours, SDPA's best."""
    from lvx_megatron.ops import distributed_cross_attention

    t = cfg.model.text
    heads, groups = t.num_attention_heads, t.num_query_groups
    d = t.hidden_size // heads
    dtype = torch.bfloat16 if cfg.training.precision == "bf16" else torch.float32
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(1, 1, heads, d, device="cuda", dtype=dtype, generator=g)
    k, v = (torch.randn(1, visual_tokens, groups, d, device="cuda", dtype=dtype, generator=g) for _ in "kv")
    ours = 1e3 * median_cuda_ms(lambda: distributed_cross_attention(q, k, v, group=None), ITERS, WARMUP)
    qh, kh, vh = (x.transpose(1, 2) for x in (q, k, v))  # SDPA's [B, H, S, D]
    sdpa = {}
    for name, kernel in SDPA_KERNELS.items():
        try:
            with torch.nn.attention.sdpa_kernel(kernel):

                def attend():
                    return F.scaled_dot_product_attention(qh, kh, vh, enable_gqa=True)

                sdpa[name] = 1e3 * median_cuda_ms(attend, ITERS, WARMUP)
        except RuntimeError:  # this kernel does not take the shape or the GQA layout
            continue
    best = min(sdpa, key=sdpa.get) if sdpa else None
    ratio = ours / sdpa[best] if best else None
    return {
        "xattn_ours_us": ours,
        "xattn_sdpa_us": sdpa.get(best),
        "sdpa_kernel": best,
        "ours_over_sdpa": ratio,
        "sdpa_all_us": sdpa,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from megatron.core import parallel_state

    from lvx_megatron.generation.loading import generation_config, in_run_precision
    from lvx_megatron.hf.model import init_single_process
    from lvx_megatron.training.config import load_config
    from lvx_megatron.training.data import make_tokenizer
    from lvx_megatron.training.setup import build_model, init_model_parallel

    if not torch.cuda.is_available():
        raise SystemExit("error: tools/bench_generation.py needs a CUDA device")
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    init_single_process()
    configs = {f: generation_config(load_config(args.config, {"data.max_images": f}), None, None) for f in args.frames}
    first = configs[args.frames[0]]
    tokenizer = make_tokenizer(first)
    _, model = build_model(first, tokenizer.vocab_size, init_model_parallel(first), torch.device("cuda"))
    model = in_run_precision(model).eval()
    writer = dist.get_rank() == 0
    rows = []
    for frames, cfg in configs.items():
        row = generation_row(model, cfg, tokenizer, frames, args.new_tokens, args.iters)
        if dist.get_world_size() == 1:
            row.update(decode_attention_us(cfg, row["visual_tokens"]))
        rows.append(row)
        if writer:
            times = f"prefill {row['prefill_ms']:.1f} ms, decode {row['decode_ms']:.2f} ms a token"
            print(f"[bench_generation] {frames} frames: {times}", flush=True)
    if writer:
        print(rows_table(rows, TABLE_COLUMNS))
        if args.output:
            meta = {"config": args.config, "weights": "random (timing only)"}
            write_results(args.output, "bench_generation.py", argv, meta, rows=rows)
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
