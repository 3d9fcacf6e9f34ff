"""Block-attention benchmark on the query ring's per-step shape: small query block, large local KV.

Prints one table: per shape and variant, forward and forward+backward time (median of CUDA-event
timings) and TFLOP/s, counting ``4 * B * Hq * Sq * Skv * d`` flops forward and 3.5x that for
forward+backward. Variants:

- ``fused/auto``, ``fused/flash``, ``fused/cudnn``, ``fused/efficient``: our fused backend (GQA
  heads packed into rows), with its own kernel choice or one kernel for both directions;
- ``fused/masked``: the fused backend given a dense mask (memory-efficient kernel with a bias);
- ``sdpa/flash``, ``sdpa/cudnn``, ``sdpa/efficient``: torch's public SDPA with ``enable_gqa``
  (or K/V expanded where the kernel needs it), the best plain torch kernels;
- ``query_ring n=1``: ``distributed_cross_attention`` on one rank (the ring's own overhead).

    python tools/bench_block_attention.py --output benchmarks/results/block_attention_h100.json
"""

import argparse
import itertools
import statistics
import sys

import torch
import torch.nn.functional as F
from results_file import write_results
from torch.nn.attention import SDPBackend, sdpa_kernel

from lvx_megatron.ops import TorchFusedBackend, distributed_cross_attention
from lvx_megatron.ops.problem import output_delta


def _time_ms(fn, warmup: int, iters: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _variants(q, k, v, scale):
    """name -> (forward fn, forward+backward fn)."""
    dout = torch.randn_like(q)
    out = {}
    for kernel in ("auto", "flash", "cudnn", "efficient"):
        be = TorchFusedBackend(kernel)
        o, lse = be.forward(q, k, v, None, scale)
        delta = output_delta(dout, o)

        def fwd(be=be):
            be.forward(q, k, v, None, scale)

        def fwd_bwd(be=be, lse=lse, delta=delta):
            be.forward(q, k, v, None, scale)
            be.backward(dout, q, k, v, lse, delta, None, scale)

        out[f"fused/{kernel}"] = (fwd, fwd_bwd)

    # A mask (all visible, so the numbers compare with the unmasked rows): the fused backend
    # runs masked blocks on the memory-efficient kernel with an additive bias.
    mask = torch.ones(q.shape[0], q.shape[1], k.shape[1], dtype=torch.bool, device=q.device)
    masked = TorchFusedBackend()
    o, lse = masked.forward(q, k, v, mask, scale)
    delta = output_delta(dout, o)

    def masked_fwd():
        masked.forward(q, k, v, mask, scale)

    def masked_fwd_bwd():
        masked.forward(q, k, v, mask, scale)
        masked.backward(dout, q, k, v, lse, delta, mask, scale)

    out["fused/masked"] = (masked_fwd, masked_fwd_bwd)

    g = q.shape[2] // k.shape[2]
    qh = q.transpose(1, 2).detach().requires_grad_()
    kh = k.transpose(1, 2).detach().requires_grad_()
    vh = v.transpose(1, 2).detach().requires_grad_()
    doh = dout.transpose(1, 2)
    for name, backend in (
        ("flash", SDPBackend.FLASH_ATTENTION),
        ("cudnn", SDPBackend.CUDNN_ATTENTION),
        ("efficient", SDPBackend.EFFICIENT_ATTENTION),
    ):
        expand = name != "flash" and g > 1

        def call(backend=backend, expand=expand):
            with sdpa_kernel(backend):
                if expand:
                    return F.scaled_dot_product_attention(
                        qh, kh.repeat_interleave(g, 1), vh.repeat_interleave(g, 1), scale=scale
                    )
                return F.scaled_dot_product_attention(qh, kh, vh, scale=scale, enable_gqa=g > 1)

        def fwd(call=call):
            with torch.no_grad():
                call()

        def fwd_bwd(call=call):
            torch.autograd.grad(call(), (qh, kh, vh), doh)

        out[f"sdpa/{name}"] = (fwd, fwd_bwd)

    ql, kl, vl = (t.detach().requires_grad_() for t in (q, k, v))

    def ring_fwd():
        with torch.no_grad():
            distributed_cross_attention(ql, kl, vl, softmax_scale=scale)

    def ring_fwd_bwd():
        torch.autograd.grad(distributed_cross_attention(ql, kl, vl, softmax_scale=scale), (ql, kl, vl), dout)

    out["query_ring n=1"] = (ring_fwd, ring_fwd_bwd)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--heads", default="32/8,32/32", help="comma-separated Hq/Hkv pairs")
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--sq", default="64,256,1024,4096", help="comma-separated query block lengths")
    parser.add_argument("--skv", default="16384,65536", help="comma-separated local KV lengths")
    parser.add_argument("--dtype", choices=("bfloat16", "float16"), default="bfloat16")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--output", help="JSON results file")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_block_attention needs a CUDA device", file=sys.stderr)
        return 2
    dtype = getattr(torch, args.dtype)
    heads = [tuple(int(x) for x in pair.split("/")) for pair in args.heads.split(",")]
    rows = []
    print(
        f"{'Hq/Hkv':>7}{'Sq':>6}{'Skv':>8}  {'variant':<16}{'fwd ms':>9}{'fwd TF/s':>10}{'f+b ms':>9}{'f+b TF/s':>10}",
        flush=True,
    )
    for (hq, hkv), sq, skv in itertools.product(heads, map(int, args.sq.split(",")), map(int, args.skv.split(","))):
        torch.manual_seed(0)
        q = torch.randn(1, sq, hq, args.head_dim, device="cuda", dtype=dtype)
        k = torch.randn(1, skv, hkv, args.head_dim, device="cuda", dtype=dtype)
        v = torch.randn(1, skv, hkv, args.head_dim, device="cuda", dtype=dtype)
        flops = 4 * hq * sq * skv * args.head_dim
        for name, (fwd, fwd_bwd) in _variants(q, k, v, args.head_dim**-0.5).items():
            try:
                t_f = _time_ms(fwd, args.warmup, args.iters)
                t_fb = _time_ms(fwd_bwd, args.warmup, args.iters)
            except RuntimeError as err:  # a kernel that does not take this shape
                if "CUDA error" in str(err):
                    raise  # the context is lost; later numbers would be meaningless
                print(f"{hq:>4}/{hkv:<2}{sq:>6}{skv:>8}  {name:<16} unsupported: {str(err).splitlines()[0][:60]}")
                rows.append(dict(hq=hq, hkv=hkv, sq=sq, skv=skv, variant=name, error=str(err).splitlines()[0]))
                continue
            row = dict(
                hq=hq,
                hkv=hkv,
                sq=sq,
                skv=skv,
                variant=name,
                fwd_ms=t_f,
                fwd_bwd_ms=t_fb,
                fwd_tflops=flops / t_f / 1e9,
                fwd_bwd_tflops=3.5 * flops / t_fb / 1e9,
            )
            rows.append(row)
            print(
                f"{hq:>4}/{hkv:<2}{sq:>6}{skv:>8}  {name:<16}{t_f:>9.3f}{row['fwd_tflops']:>10.1f}"
                f"{t_fb:>9.3f}{row['fwd_bwd_tflops']:>10.1f}",
                flush=True,
            )
        del q, k, v
        torch.cuda.empty_cache()
    if args.output:
        extra = {
            "dtype": args.dtype,
            "head_dim": args.head_dim,
            "batch": 1,
            "flops": "fwd 4*B*Hq*Sq*Skv*d, fwd+bwd 3.5x",
        }
        write_results(args.output, "bench_block_attention.py", argv, extra, results=rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
