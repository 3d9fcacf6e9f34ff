"""The mllama vision encoder of a config on this GPU: its forward+backward rate and its attention's.

    python tools/bench_vision_encoder.py --output benchmarks/results/vision_encoder_h200.json

For the model of ``--config`` (default ``examples/configs/single-gpu-1b.yaml``: 20 layers, width
1,024, 32 frames of 1,025 tokens padded to 1,032 per micro-batch), bf16, times one micro-batch's
frames through the encoder, forward and backward:

* ``encoder, eager``: what training runs;
* ``encoder, torch.compile per layer``: each transformer layer compiled (fused norms, GELU, residuals);

and its self-attention alone at the encoder's shape ``[frames, heads, 1,032, head dim]``:

* ``attention, dense padding mask``: what the encoder runs (the reference's additive mask);
* ``attention, split rows``: the same result as one unmasked call for the real rows plus one for the
  7 padding rows over the real keys (exact for one tile per image);
* ``attention, no mask (special case, not the model's result)``: the kernel's unmasked rate.

Each row is the median of ``--iters`` timed repetitions (CUDA events) after warm-up, with TFLOP/s
from the model FLOPs (``training/flops.py``: forward x3) and, for attention rows, from
``4 * s^2 * d`` per head forward, x3.5 with backward. Needs CUDA.
"""

import argparse

import torch
import torch.nn.functional as F

from lvx_megatron.cuda_timing import median_cuda_ms
from lvx_megatron.models.mllama_vision import MllamaVisionEncoder
from lvx_megatron.results import rows_table, write_results
from lvx_megatron.training.config import load_config
from lvx_megatron.training.families.mllama import vision_config
from lvx_megatron.training.flops import forward_flops_per_sample, peak_flops

# What README's table shows (render_results.py rows_table with the same columns).
TABLE_COLUMNS = [
    ("case", ""),
    ("frames", "d"),
    ("ms", ".2f"),
    ("tflops", ".0f"),
    ("of_peak", ".1%"),
    ("max_abs_diff_vs_dense", ".1e"),
]


def encoder_rows(cfg, iters: int) -> list[dict]:
    """Forward+backward of one micro-batch's frames, eager and with each layer compiled."""
    v, frames = cfg.model.vision, cfg.data.max_images * cfg.training.micro_batch_size
    encoder = MllamaVisionEncoder(vision_config(cfg)).to("cuda", torch.bfloat16)
    pixels = torch.randn(1, frames, v.max_num_tiles, 3, v.image_size, v.image_size, device="cuda")
    ids = torch.ones(1, frames, dtype=torch.long, device="cuda")
    tiles = torch.ones(1, frames, v.max_num_tiles, dtype=torch.long, device="cuda")
    flops = 3 * forward_flops_per_sample(cfg, padded_vocab_size=0)["vision"] * cfg.training.micro_batch_size

    def step() -> None:
        encoder(pixels, ids, tiles).float().square().mean().backward()

    rows = [{"case": "encoder, eager", "frames": frames, "ms": median_cuda_ms(step, iters), "flops": flops}]
    for layer in (*encoder.transformer.layers, *encoder.global_transformer.layers):
        layer.forward = torch.compile(layer.forward, dynamic=False)
    rows.append(
        {
            "case": "encoder, torch.compile per layer",
            "frames": frames,
            "ms": median_cuda_ms(step, iters),
            "flops": flops,
        }
    )
    return rows


def attention_rows(cfg, iters: int) -> list[dict]:
    """The encoder's self-attention at its shape, three ways (see the module docstring)."""
    v, frames = cfg.model.vision, cfg.data.max_images * cfg.training.micro_batch_size
    real = (v.image_size // v.patch_size) ** 2 + 1
    seq = -(-real // 8) * 8
    heads, dim = v.attention_heads, v.hidden_size // v.attention_heads
    q, k, v_ = (
        torch.randn(frames, heads, seq, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3)
    )
    grad = torch.randn_like(q)
    pad = torch.arange(seq, device="cuda") >= real
    mask = torch.zeros(frames, 1, seq, seq, device="cuda", dtype=torch.bfloat16)
    mask.masked_fill_(pad[:, None] & pad[None, :], torch.finfo(torch.bfloat16).min)

    def split(q, k, v):
        rows = F.scaled_dot_product_attention(q[:, :, :real], k, v)
        pad_rows = F.scaled_dot_product_attention(q[:, :, real:], k[:, :, :real], v[:, :, :real])
        return torch.cat([rows, pad_rows], 2)

    cases = {
        "attention, dense padding mask": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask),
        "attention, split rows": split,
        "attention, no mask (special case, not the model's result)": F.scaled_dot_product_attention,
    }
    reference = cases["attention, dense padding mask"](q, k, v_).float()
    flops = 3.5 * 4 * frames * heads * seq * seq * dim
    rows = []
    for name, fn in cases.items():
        err = (fn(q, k, v_).float() - reference).abs().max().item()
        ms = median_cuda_ms(lambda fn=fn: fn(q, k, v_).backward(grad), iters)
        rows.append({"case": name, "frames": frames, "ms": ms, "flops": flops, "max_abs_diff_vs_dense": err})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="examples/configs/single-gpu-1b.yaml")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--output", help="results JSON to write")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        parser.error("needs a CUDA device")
    cfg = load_config(args.config)
    if cfg.model.architecture != "mllama":
        parser.error(f"--config: the mllama vision encoder only, got architecture {cfg.model.architecture!r}")
    name, peak = torch.cuda.get_device_name(), peak_flops(torch.device("cuda"))
    rows = encoder_rows(cfg, args.iters) + attention_rows(cfg, args.iters)
    for row in rows:
        row["tflops"] = row["flops"] / row["ms"] / 1e9
        row["of_peak"] = row["tflops"] * 1e12 / peak if peak else None
    print(f"{name}, {args.config}, bf16, forward+backward")
    print(rows_table(rows, TABLE_COLUMNS))
    if args.output:
        write_results(args.output, "bench_vision_encoder.py", None, {"config": args.config}, rows=rows)
        print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
