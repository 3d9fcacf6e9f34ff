"""GPU check of the megatron cross-attention block: CPU parity and recompute memory.

1. Parity: a small decoder block (self- and cross-attention layers, GQA, masks) with the same
   weights on CPU (float32, torch backend) and on CUDA (float32 and bfloat16, fused kernels);
   relative errors of the output and all gradients.
2. Memory: peak memory of forward+backward of ``L`` gated cross-attention layers (Llama-3.2-11B
   widths) at a long visual length, with ``recompute_visual_kv`` on and off, for L in 2, 4, 8.

    python tools/xattn_memory.py --output benchmarks/results/xattn_memory_h100.json
"""

import argparse
import os
import socket
import sys
import zlib

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
from megatron.core.transformer.transformer_block import TransformerBlock

from lvx_megatron.core import CrossAttentionMask, cross_attention_decoder_block_spec, llama_style_config
from lvx_megatron.results import write_results

# The parity block (GQA 8/2, cross-attention at layers 1 and 3) and one Llama-3.2-11B layer's widths.
SMALL_BLOCK = dict(num_layers=4, hidden_size=256, num_attention_heads=8, num_query_groups=2, ffn_hidden_size=512)
LLAMA_11B_LAYER = dict(hidden_size=4096, num_attention_heads=32, num_query_groups=8, ffn_hidden_size=14336)


def _config(dtype, cross_layers, visual_hidden, recompute, backend, **sizes):
    return llama_style_config(
        **sizes,
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        cross_attention_layers=list(cross_layers),
        cross_attention_backend=backend,
        recompute_visual_kv=recompute,
        visual_hidden_size=visual_hidden,
        cross_attention_gate_init=0.5,
    )


def _block(config, device):
    pg = ProcessGroupCollection.use_mpu_process_groups()
    return TransformerBlock(config, spec=cross_attention_decoder_block_spec(config), pg_collection=pg).to(device)


def parity() -> list[dict]:
    """Same weights and data on CPU (fp32 reference) and CUDA (fp32, bf16)."""
    torch.manual_seed(0)
    text, visual, batch, ids = 48, 1000, 2, 4
    data = dict(
        hidden=torch.randn(text, batch, 256),
        x=torch.randn(visual, batch, 192),
        q_mask=torch.rand(batch, text, ids) < 0.6,
        kv_ids=torch.randint(-1, ids, (batch, visual)),
        dout=torch.randn(text, batch, 256),
    )
    data["q_mask"][:, :5] = False
    runs = {}
    for name, device, dtype, backend in (
        ("cpu-fp32", "cpu", torch.float32, "torch"),
        ("cuda-fp32", "cuda", torch.float32, "auto"),
        ("cuda-bf16", "cuda", torch.bfloat16, "auto"),
    ):
        cfg = _config(dtype, [1, 3], 192, True, backend, **SMALL_BLOCK)
        block = _block(cfg, device)
        with torch.no_grad():
            for pname, p in block.named_parameters():
                gen = torch.Generator().manual_seed(zlib.crc32(pname.encode()))
                value = (
                    (1 + 0.1 * torch.randn(p.shape, generator=gen))
                    if "norm" in pname
                    else 0.05 * torch.randn(p.shape, generator=gen)
                )
                p.copy_(value.to(p.dtype))
        h = data["hidden"].detach().to(device, dtype).requires_grad_()
        x = data["x"].detach().to(device, dtype).requires_grad_()
        mask = CrossAttentionMask(data["q_mask"].to(device), data["kv_ids"].to(device))
        out = block(hidden_states=h, attention_mask=None, context=x, context_mask=mask)
        out.backward(data["dout"].to(device, dtype))
        grads = {n: p.grad.float().cpu() for n, p in block.named_parameters()}
        runs[name] = dict(out=out.detach().float().cpu(), dh=h.grad.float().cpu(), dx=x.grad.float().cpu(), grads=grads)
    ref = runs["cpu-fp32"]
    rows = []
    for name in ("cuda-fp32", "cuda-bf16"):
        run = runs[name]
        rel = lambda a, b: (
            float((a - b).norm() / b.norm().clamp_min(1e-12)) if torch.isfinite(a).all() else float("nan")
        )
        errs = {"out": rel(run["out"], ref["out"]), "dh": rel(run["dh"], ref["dh"]), "dx": rel(run["dx"], ref["dx"])}
        errs["params_worst"] = max(rel(run["grads"][n], ref["grads"][n]) for n in ref["grads"])
        rows.append({"run": name, "errors": errs})
    return rows


def memory(layers: int, recompute: bool, text: int, visual: int) -> dict:
    """Peak bytes above the block's weights and inputs for one forward+backward."""
    cfg = _config(torch.bfloat16, range(layers), 4096, recompute, "auto", num_layers=layers, **LLAMA_11B_LAYER)
    block = _block(cfg, "cuda")
    h = torch.randn(text, 1, 4096, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    x = torch.randn(visual, 1, 4096, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = block(hidden_states=h, attention_mask=None, context=x, context_mask=None)
    after_forward = torch.cuda.memory_allocated() - base
    out.backward(torch.ones_like(out))
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    kv_per_layer = 2 * visual * 8 * 128 * 2
    del block, h, x, out
    torch.cuda.empty_cache()
    case = dict(layers=layers, recompute=recompute, text=text, visual=visual)
    return dict(case, kept_after_forward=after_forward, peak=peak, kv_bytes_per_layer=kv_per_layer)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--text", type=int, default=2048)
    parser.add_argument(
        "--visual",
        default="65536,131072",
        help="comma-separated visual lengths (6404 tokens per Llama-3.2-Vision image)",
    )
    parser.add_argument("--output", help="JSON results file")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("xattn_memory needs a CUDA device", file=sys.stderr)
        return 2
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(s.getsockname()[1]))
    dist.init_process_group("nccl", rank=0, world_size=1)
    parallel_state.initialize_model_parallel(1, 1)
    model_parallel_cuda_manual_seed(0)

    par = parity()
    for row in par:
        print(row["run"], " ".join(f"{k}={v:.2e}" for k, v in row["errors"].items()), flush=True)
    mem = []
    print(
        f"{'visual':>7} {'layers':>6} {'recompute':>9} {'kept after fwd GiB':>19} {'peak GiB':>9} {'K/V/layer GiB':>14}"
    )
    for visual in map(int, args.visual.split(",")):
        for layers in (2, 4, 8):
            for recompute in (True, False):
                r = memory(layers, recompute, args.text, visual)
                mem.append(r)
                print(
                    f"{visual:>7} {layers:>6} {recompute!s:>9} {r['kept_after_forward'] / 2**30:>19.3f} "
                    f"{r['peak'] / 2**30:>9.3f} {r['kv_bytes_per_layer'] / 2**30:>14.3f}",
                    flush=True,
                )
    if args.output:
        extra = {"dtype": "bfloat16", "widths": "hidden 4096, 32/8 heads, d 128, ffn 14336"}
        write_results(args.output, "xattn_memory.py", argv, extra, parity=par, memory=mem)
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
