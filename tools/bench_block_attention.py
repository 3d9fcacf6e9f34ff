"""Block-attention benchmark on the query ring's per-step shape: small query block, large local KV.

Prints one table: per shape and variant, forward and forward+backward time (median of CUDA-event
timings) and TFLOP/s, counting ``4 * B * Hq * Sq * Skv * d`` flops forward and 3.5x that for
forward+backward; then a summary per shape: our Triton kernel against the best torch kernel, and
the dense bf16 matmul rate measured in the same run. Variants:

- ``triton``: our Triton kernels (:class:`~lvx_megatron.ops.TritonBackend`), unmasked;
- ``triton/masked``, ``triton/masked skip``: the same given the compact image-id mask (every key
  visible, so the numbers compare with the unmasked rows), without and with the empty-tile test;
- ``fused/auto``, ``fused/flash``, ``fused/cudnn``, ``fused/efficient``: torch's fused kernels with
  GQA heads packed into rows, with their own kernel choice or one kernel for both directions;
- ``fused/masked``: torch's fused kernels given a dense mask (memory-efficient kernel with a bias);
- ``sdpa/flash``, ``sdpa/cudnn``, ``sdpa/efficient``: torch's public SDPA with ``enable_gqa``
  (or K/V expanded where the kernel needs it);
- ``auto``: the per-shape selection (``backend="auto"``);
- ``query_ring n=1``: ``distributed_cross_attention`` on one rank (the ring's own overhead).

``--sweep`` instead times the Triton kernels over a grid of tile sizes and split waves per shape
(how the defaults in ``lvx_megatron/ops/backends/triton_backend.py`` were chosen).

    python tools/bench_block_attention.py --output benchmarks/results/block_attention_h100.json
"""

import argparse
import itertools
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from results_file import write_results
from torch.nn.attention import SDPBackend, sdpa_kernel

from lvx_megatron.ops import TorchFusedBackend, TritonBackend, distributed_cross_attention, get_backend
from lvx_megatron.ops.backends.triton_backend import KernelConfig
from lvx_megatron.ops.masks import BlockMask
from lvx_megatron.ops.problem import output_delta

TORCH_UNMASKED = (
    "fused/auto", "fused/flash", "fused/cudnn", "fused/efficient", "sdpa/flash", "sdpa/cudnn", "sdpa/efficient",
)  # fmt: skip


def _time_ms(fn, max_iters: int, budget_s: float = 0.5) -> float:
    """Median CUDA-event time of ``fn``; long-running calls get fewer iterations (at least 3)."""
    fn()  # compile / warm up
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    once = time.perf_counter() - start
    iters = max(3, min(max_iters, int(budget_s / max(once, 1e-6))))
    times = []
    for _ in range(iters):
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(begin.elapsed_time(end))
    return statistics.median(times)


def _backend_fns(be, q, k, v, mask, scale, dout):
    o, lse = be.forward(q, k, v, mask, scale)
    delta = output_delta(dout, o)

    def fwd():
        be.forward(q, k, v, mask, scale)

    def fwd_bwd():
        be.forward(q, k, v, mask, scale)
        be.backward(dout, q, k, v, lse, delta, mask, scale)

    return fwd, fwd_bwd


def _variants(q, k, v, scale):
    """name -> (forward fn, forward+backward fn)."""
    dout = torch.randn_like(q)
    all_visible = BlockMask(None, torch.zeros(k.shape[0], k.shape[1], dtype=torch.int64, device=k.device), q.shape[1])
    out = {
        "triton": _backend_fns(TritonBackend(), q, k, v, None, scale, dout),
        "triton/masked": _backend_fns(TritonBackend(), q, k, v, all_visible, scale, dout),
        "triton/masked skip": _backend_fns(TritonBackend(skip_empty_tiles=True), q, k, v, all_visible, scale, dout),
        "auto": _backend_fns(get_backend("auto", q.device, q.dtype), q, k, v, None, scale, dout),
    }
    for kernel in ("auto", "flash", "cudnn", "efficient"):
        out[f"fused/{kernel}"] = _backend_fns(TorchFusedBackend(kernel), q, k, v, None, scale, dout)
    out["fused/masked"] = _backend_fns(TorchFusedBackend(), q, k, v, all_visible, scale, dout)

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


SWEEP_FORWARD = [KernelConfig(m, n, w, s) for m, n, w, s in [
    (128, 64, 8, 3), (128, 64, 8, 4), (64, 64, 4, 3), (128, 32, 4, 4), (128, 128, 8, 3),
]]  # fmt: skip
SWEEP_DKDV = [KernelConfig(m, n, w, s) for m, n, w, s in [
    (64, 64, 4, 2), (64, 64, 4, 3), (32, 128, 4, 3), (32, 128, 4, 5), (64, 128, 8, 2), (64, 128, 8, 3),
    (32, 64, 4, 3), (128, 64, 8, 2), (64, 128, 4, 2),
]]  # fmt: skip
SWEEP_DQ = [KernelConfig(m, n, w, s) for m, n, w, s in [
    (128, 64, 8, 3), (128, 64, 8, 2), (64, 64, 4, 3), (128, 128, 8, 2), (64, 128, 4, 2), (128, 32, 4, 3),
]]  # fmt: skip


def _sweep(q, k, v, scale, iters: int) -> list[dict]:
    """Time each Triton kernel over a grid of tiles (the split-KV ones also over waves 1, 2, 4)."""
    dout = torch.randn_like(q)
    o, lse = TritonBackend().forward(q, k, v, None, scale)
    delta = output_delta(dout, o)
    grid = [("forward", TritonBackend(forward_tiles=c, waves=w), c, w) for c in SWEEP_FORWARD for w in (1.0, 2.0, 4.0)]
    grid += [("dkdv", TritonBackend(dkdv_tiles=c), c, None) for c in SWEEP_DKDV]
    grid += [("dq", TritonBackend(dq_tiles=c, waves=w), c, w) for c in SWEEP_DQ for w in (1.0, 2.0, 4.0)]
    rows = []
    for kernel, be, cfg, waves in grid:
        if kernel == "forward":
            fn = lambda be=be: be.forward(q, k, v, None, scale)
        else:  # the other backward kernel runs with its default tiles; the difference is this one's
            fn = lambda be=be: be.backward(dout, q, k, v, lse, delta, None, scale)
        rows.append(dict(kernel=kernel, config=cfg.__dict__, waves=waves, ms=_time_ms(fn, iters)))
    return rows


def _matmul_tflops(dtype: torch.dtype, n: int = 8192) -> float:
    a, b = torch.randn(n, n, device="cuda", dtype=dtype), torch.randn(n, n, device="cuda", dtype=dtype)
    return 2 * n**3 / _time_ms(lambda: a @ b, 20) / 1e9


def _summary(rows: list[dict], matmul: float) -> list[dict]:
    """Per shape: ours against the best torch kernel, forward and forward+backward."""
    out = []
    key = lambda r: (r["hq"], r["hkv"], r["sq"], r["skv"])
    for shape, group in itertools.groupby(sorted((r for r in rows if "error" not in r), key=key), key=key):
        by_name = {r["variant"]: r for r in group}
        if "triton" not in by_name:
            continue
        entry = dict(zip(("hq", "hkv", "sq", "skv"), shape, strict=True))
        for metric in ("fwd", "fwd_bwd"):
            torch_rows = [by_name[n] for n in TORCH_UNMASKED if n in by_name]
            best = max(torch_rows, key=lambda r: r[f"{metric}_tflops"])
            ours = by_name["triton"][f"{metric}_tflops"]
            entry[metric] = dict(
                triton_tflops=ours,
                best_torch_tflops=best[f"{metric}_tflops"],
                best_torch=best["variant"],
                ratio=ours / best[f"{metric}_tflops"],
                auto_tflops=by_name["auto"][f"{metric}_tflops"] if "auto" in by_name else None,
                triton_masked_tflops=by_name.get("triton/masked", {}).get(f"{metric}_tflops"),
                fused_masked_tflops=by_name.get("fused/masked", {}).get(f"{metric}_tflops"),
                matmul_fraction=ours / matmul,
            )
        if "query_ring n=1" in by_name and "auto" in by_name:  # the ring runs the same backend selection
            entry["query_ring_over_kernel"] = by_name["query_ring n=1"]["fwd_bwd_ms"] / by_name["auto"]["fwd_bwd_ms"]
        out.append(entry)
    return out


def _print_summary(summary: list[dict], matmul: float) -> None:
    print(f"\ndense bf16 matmul 8192^3: {matmul:.0f} TFLOP/s (same run)")
    print(
        f"{'Hq/Hkv':>7}{'Sq':>6}{'Skv':>8}  {'fwd ours':>9}{'best torch':>11}{'ratio':>7}"
        f"  {'f+b ours':>9}{'best torch':>11}{'ratio':>7}  {'best torch f+b kernel':<18}{'ring/auto':>10}"
    )
    for e in summary:
        f, fb = e["fwd"], e["fwd_bwd"]
        ring = e.get("query_ring_over_kernel")
        print(
            f"{e['hq']:>4}/{e['hkv']:<2}{e['sq']:>6}{e['skv']:>8}"
            f"  {f['triton_tflops']:>9.0f}{f['best_torch_tflops']:>11.0f}"
            f"{f['ratio']:>7.2f}  {fb['triton_tflops']:>9.0f}{fb['best_torch_tflops']:>11.0f}{fb['ratio']:>7.2f}"
            f"  {fb['best_torch']:<18}{(f'{ring:.3f}' if ring else '-'):>10}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--heads", default="32/8,32/32", help="comma-separated Hq/Hkv pairs")
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--sq", default="64,128,256,1024,4096", help="comma-separated query block lengths")
    parser.add_argument("--skv", default="16384,65536,262144", help="comma-separated local KV lengths")
    parser.add_argument("--dtype", choices=("bfloat16", "float16"), default="bfloat16")
    parser.add_argument("--iters", type=int, default=20, help="most timed iterations per measurement")
    parser.add_argument("--variants", help="comma-separated subset of variants (default: all)")
    parser.add_argument("--sweep", action="store_true", help="time the Triton kernels over tile sizes instead")
    parser.add_argument("--output", help="JSON results file")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_block_attention needs a CUDA device", file=sys.stderr)
        return 2
    dtype = getattr(torch, args.dtype)
    heads = [tuple(int(x) for x in pair.split("/")) for pair in args.heads.split(",")]
    wanted = None if args.variants is None else set(args.variants.split(","))
    rows: list[dict] = []
    if not args.sweep:
        header = f"{'variant':<16}{'fwd ms':>9}{'fwd TF/s':>10}{'f+b ms':>9}{'f+b TF/s':>10}"
        print(f"{'Hq/Hkv':>7}{'Sq':>6}{'Skv':>8}  {header}", flush=True)
    for (hq, hkv), sq, skv in itertools.product(heads, map(int, args.sq.split(",")), map(int, args.skv.split(","))):
        torch.manual_seed(0)
        q = torch.randn(1, sq, hq, args.head_dim, device="cuda", dtype=dtype)
        k = torch.randn(1, skv, hkv, args.head_dim, device="cuda", dtype=dtype)
        v = torch.randn(1, skv, hkv, args.head_dim, device="cuda", dtype=dtype)
        flops = 4 * hq * sq * skv * args.head_dim
        if args.sweep:
            for row in _sweep(q, k, v, args.head_dim**-0.5, args.iters):
                factor = 1.0 if row["kernel"] == "forward" else 2.5  # backward rows time both kernels
                row.update(hq=hq, hkv=hkv, sq=sq, skv=skv, tflops=factor * flops / row["ms"] / 1e9)
                rows.append(row)
                print(f"{hq:>4}/{hkv:<2}{sq:>6}{skv:>8}  {row['kernel']:<9}{row['config']!s:<72}"
                      f" waves={row['waves']}  {row['ms']:.3f} ms  {row['tflops']:.0f} TF/s", flush=True)  # fmt: skip
            continue
        for name, (fwd, fwd_bwd) in _variants(q, k, v, args.head_dim**-0.5).items():
            if wanted is not None and name not in wanted:
                continue
            try:
                t_f = _time_ms(fwd, args.iters)
                t_fb = _time_ms(fwd_bwd, args.iters)
            except (RuntimeError, ValueError) as err:  # a kernel that does not take this shape
                if "CUDA error" in str(err) or "out of memory" in str(err):
                    raise  # the context is lost; later numbers would be meaningless
                print(f"{hq:>4}/{hkv:<2}{sq:>6}{skv:>8}  {name:<16} unsupported: {str(err).splitlines()[0][:60]}")
                rows.append(dict(hq=hq, hkv=hkv, sq=sq, skv=skv, variant=name, error=str(err).splitlines()[0]))
                continue
            row = dict(
                hq=hq, hkv=hkv, sq=sq, skv=skv, variant=name, fwd_ms=t_f, fwd_bwd_ms=t_fb,
                fwd_tflops=flops / t_f / 1e9, fwd_bwd_tflops=3.5 * flops / t_fb / 1e9,
            )  # fmt: skip
            rows.append(row)
            print(
                f"{hq:>4}/{hkv:<2}{sq:>6}{skv:>8}  {name:<16}{t_f:>9.3f}{row['fwd_tflops']:>10.1f}"
                f"{t_fb:>9.3f}{row['fwd_bwd_tflops']:>10.1f}",
                flush=True,
            )
        del q, k, v
        torch.cuda.empty_cache()
    matmul = _matmul_tflops(dtype)
    summary = [] if args.sweep else _summary(rows, matmul)
    if summary:
        _print_summary(summary, matmul)
    if args.output:
        extra = {
            "dtype": args.dtype,
            "head_dim": args.head_dim,
            "batch": 1,
            "flops": "fwd 4*B*Hq*Sq*Skv*d, fwd+bwd 3.5x (sweep backward: 2.5x)",
            "matmul_tflops": matmul,
        }
        write_results(args.output, "bench_block_attention.py", argv, extra, results=rows, summary=summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
