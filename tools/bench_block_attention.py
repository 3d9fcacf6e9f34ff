"""Block-attention benchmark on the query ring's per-step shape, with the masks the models make.

One shape is one small query block against a large local KV shard (B=1). Every shape is timed
with each mask side by side in the same run (forward and forward+backward; calls issued back to
back as a training step issues them, median of CUDA-event timings), counting ``4 * Hq * d`` flops
per visible (query, key) pair forward and 3.5x that for forward+backward, so a mask that hides
keys is not credited with their work:

- ``none``: no mask (the special case, for comparison);
- ``all``: the image mask with every text token seeing every one of 8 images (video: every text
  token sees every frame), no padding;
- ``video``: 8 frames of 4 tile slots, the last slot of each padding (``-1``), every text token
  sees every frame;
- ``interleaved``: 8 images of 4 real tiles; the first half of the text sees the first 4 images,
  the second half all 8 (75% of the work visible);
- ``tiles``: 8 images of 4 tile slots with 1, 2, 3, 1, 2, 3, 1, 2 real tiles, every text token
  sees every image;
- ``segments``: the multi-image layout, 3 images and 3 text segments, segment ``i`` sees the images
  up to ``i`` (2/3 of the work visible);
- ``sparse``: 8 images and 8 text segments, segment ``j`` sees images ``j, j+1, j+2`` (mod 8): 3/8
  of the work visible, in two key ranges for some segments.

Variants: ``triton`` (our kernels, the mask's tile lists), ``fused`` (torch's fused kernels; masked
blocks as dense runs), ``auto`` (the per-call selection of ``backend="auto"``), ``op`` (the whole
``distributed_cross_attention`` on one rank with a prebuilt ``MaskPlan``, what a model layer runs),
``flex`` (FlexAttention, compiled, ``enable_gqa``, a ``mask_mod`` reading the image ids; it compiles
per shape and mask: compile seconds are recorded; ``--flex-masks`` narrows the masks), ``flex/fa4``
(the same on FlexAttention's FlashAttention-4 backend, ``kernel_options={"BACKEND": "FLASH"}``, when
flash-attn-4 imports; its ``mask_mod`` reads padding as an extra image id no text token sees, since
its DSL has no ``clamp``/``maximum``), and, unmasked only, ``sdpa/cudnn`` and ``sdpa/flash`` (torch's
public SDPA with ``enable_gqa``), ``sdpa/cudnn-expanded`` (cuDNN on K/V expanded to every query
head beforehand, untimed) and ``flash-attn-4`` when it imports. Peer packages for the GPU machine:
``scripts/fetch_gpu_wheels.sh --peers``.

The summary prints, per shape, the rates of ``auto`` per mask as a fraction of unmasked ``auto``,
the interleaved/all time ratio, the whole op against ``auto``, and ``auto`` against the best peer
timed on that mask (FlexAttention on either backend; unmasked also SDPA and flash-attn-4).

    python tools/bench_block_attention.py --output benchmarks/results/block_attention_h200.json

``--sweep`` instead times the Triton kernels over a grid of tile sizes and split waves per shape,
on unmasked blocks and with the ``all`` mask (how the defaults in
``lvx_megatron/ops/backends/triton_backend.py`` are chosen).
"""

import argparse
import itertools
import statistics
import sys
import time
from dataclasses import replace

import torch

from lvx_megatron.ops import MaskPlan, TorchFusedBackend, TritonBackend, distributed_cross_attention, get_backend
from lvx_megatron.ops.backends.triton_backend import KernelConfig
from lvx_megatron.ops.masks import BlockMask
from lvx_megatron.ops.problem import output_delta
from lvx_megatron.results import write_results

MASKS = ("none", "all", "video", "interleaved", "tiles", "segments", "sparse")
PARTIAL_MASKS = ("interleaved", "segments", "sparse")  # the summary's time over the all-visible time
IMAGES, SLOTS = 8, 4
REAL_TILES = (1, 2, 3, 1, 2, 3, 1, 2)  # the "tiles" mask: real tiles of each 4-slot image


def _time_ms(fn, max_iters: int, budget_s: float, samples: int = 5) -> float:
    """Time per call of ``fn`` issued back to back, as a training step issues its layers (the host
    runs ahead of the device; per-call host work shows only where it exceeds the device's):
    the median over ``samples`` CUDA-event timings of ``reps`` consecutive calls."""
    fn()  # compile / warm up
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    once = time.perf_counter() - start
    reps = max(1, min(max_iters, int(budget_s / samples / max(once, 1e-6))))
    times = []
    for _ in range(samples):
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        for _ in range(reps):
            fn()
        end.record()
        torch.cuda.synchronize()
        times.append(begin.elapsed_time(end) / reps)
    return statistics.median(times)


def make_mask(kind: str, sq: int, skv: int, device: torch.device) -> BlockMask | None:
    """One of :data:`MASKS` for a block of ``sq`` text tokens and ``skv`` visual tokens (B = 1)."""
    if kind == "none":
        return None
    if kind in ("segments", "sparse"):
        images = 3 if kind == "segments" else IMAGES
        ids = torch.arange(skv, device=device) * images // skv
        segment = torch.arange(sq, device=device) * images // sq
        image = torch.arange(images, device=device)
        if kind == "segments":
            q_mask = image[None, :] <= segment[:, None]
        else:
            q_mask = (image[None, :] - segment[:, None]) % images < 3
        return BlockMask(q_mask.unsqueeze(0), ids.view(1, -1), sq)
    slot = -(-skv // (IMAGES * SLOTS))
    tile = torch.arange(skv, device=device) // slot  # tile slot of each key
    image, within = tile // SLOTS, tile % SLOTS
    q_mask = torch.ones(1, sq, IMAGES * SLOTS, dtype=torch.bool, device=device)
    ids = tile.clone()
    if kind == "video":
        ids[within == SLOTS - 1] = -1
    elif kind == "tiles":
        real = torch.tensor(REAL_TILES, device=device)[image]
        ids[within >= real] = -1
    elif kind == "interleaved":
        q_mask[:, : sq // 2, IMAGES // 2 * SLOTS :] = False
    return BlockMask(q_mask, ids.view(1, -1), sq)


def visible_pairs(mask: BlockMask | None, sq: int, skv: int) -> int:
    """(query, key) pairs the mask lets attend (every pair without a mask)."""
    if mask is None:
        return sq * skv
    return sum((r1 - r0) * sum(c1 - c0 for c0, c1 in keys) for runs in mask.dense_runs() for r0, r1, keys in runs)


def _backend_fns(backend, q, k, v, mask, scale, dout):
    o, lse = backend.forward(q, k, v, mask, scale)
    delta = output_delta(dout, o)

    def fwd():
        backend.forward(q, k, v, mask, scale)

    def fwd_bwd():
        backend.forward(q, k, v, mask, scale)
        backend.backward(dout, q, k, v, lse, delta, mask, scale)

    return fwd, fwd_bwd


def _op_fns(q, k, v, mask, scale, dout):
    """The whole op on one rank with the mask planned once, as a model layer calls it."""
    plan = None if mask is None else MaskPlan.build(mask.q_image_mask, mask.kv_image_ids)
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]

    def fwd():
        with torch.no_grad():
            distributed_cross_attention(*leaves, softmax_scale=scale, mask_plan=plan)

    def fwd_bwd():
        out = distributed_cross_attention(*leaves, softmax_scale=scale, mask_plan=plan)
        torch.autograd.grad(out, leaves, dout)

    return fwd, fwd_bwd


def _sdpa_fns(q, k, v, scale, dout, backend):
    from torch.nn.attention import sdpa_kernel

    qh, kh, vh = (t.transpose(1, 2).detach().requires_grad_() for t in (q, k, v))
    doh = dout.transpose(1, 2)

    def call():
        with sdpa_kernel(backend):
            return torch.nn.functional.scaled_dot_product_attention(qh, kh, vh, scale=scale, enable_gqa=True)

    def fwd():
        with torch.no_grad():
            call()

    def fwd_bwd():
        torch.autograd.grad(call(), (qh, kh, vh), doh)

    return fwd, fwd_bwd


_FLEX = {}
FLEX_BACKENDS = {"flex": None, "flex/fa4": {"BACKEND": "FLASH"}}


def flex_mask_tables(mask: BlockMask) -> tuple[torch.Tensor, torch.Tensor]:
    """``(visible [Sq, N + 1], ids [Skv])`` of sample 0 such that ``visible[q, ids[k]]`` is the mask:
    padding (-1) becomes the extra id ``N``, whose column no text token sees (FA4's mask_mod DSL
    has no ``clamp``/``maximum`` to guard a ``-1`` index)."""
    num_ids = mask.q_image_mask.shape[-1]
    raw = mask.kv_image_ids[0]
    ids = torch.where(raw < 0, num_ids, raw).to(torch.int32)
    return torch.nn.functional.pad(mask.q_image_mask[0], (0, 1)), ids


def _flex_fns(q, k, v, mask, scale, dout, kernel_options: dict | None):
    """FlexAttention compiled for this shape, mask and backend (``kernel_options``); returns the
    functions and the compile seconds."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    if "fn" not in _FLEX:
        torch._dynamo.config.recompile_limit = 10_000  # the default (8) silently falls back to eager
        torch._dynamo.config.accumulated_recompile_limit = 10_000
        _FLEX["fn"] = torch.compile(flex_attention)
    sq, skv = q.shape[1], k.shape[1]
    block_mask = None
    if mask is not None:
        visible, ids = flex_mask_tables(mask)

        def mask_mod(b, h, q_idx, kv_idx):
            return visible[q_idx, ids[kv_idx]]

        block_mask = create_block_mask(mask_mod, 1, None, sq, skv, device=q.device, _compile=True)
    options = dict(kernel_options or {})
    if sq < 128 and not options:  # its short-query (decoding) path fails to compile with a block mask in torch 2.11
        options["FORCE_USE_FLEX_ATTENTION"] = True
    qh, kh, vh = (t.transpose(1, 2).detach().requires_grad_() for t in (q, k, v))
    doh = dout.transpose(1, 2)

    def call():
        return _FLEX["fn"](
            qh, kh, vh, block_mask=block_mask, scale=scale, enable_gqa=True, kernel_options=options or None
        )

    def fwd():
        with torch.no_grad():
            call()

    def fwd_bwd():
        torch.autograd.grad(call(), (qh, kh, vh), doh)

    start = time.perf_counter()
    fwd()
    fwd_bwd()
    torch.cuda.synchronize()
    return (fwd, fwd_bwd), time.perf_counter() - start


def _fa4_available() -> bool:
    try:
        import flash_attn.cute  # noqa: F401
    except ImportError:
        return False
    return True


def _expanded_sdpa_fns(q, k, v, scale, dout):
    """cuDNN SDPA on K/V expanded to every query head beforehand (the expansion is not timed)."""
    group = q.shape[2] // k.shape[2]
    k, v = (t.repeat_interleave(group, dim=2) for t in (k, v))
    from torch.nn.attention import SDPBackend

    return _sdpa_fns(q, k, v, scale, dout, SDPBackend.CUDNN_ATTENTION)


def _fa4_fns(q, k, v, scale, dout):
    """flash-attn-4 (CuTe DSL) when it imports, else None."""
    if not _fa4_available():
        return None
    from flash_attn.cute import flash_attn_func

    leaves = [t.detach().requires_grad_() for t in (q, k, v)]

    def fwd():
        with torch.no_grad():
            flash_attn_func(*leaves, softmax_scale=scale)

    def fwd_bwd():
        out = flash_attn_func(*leaves, softmax_scale=scale)
        torch.autograd.grad(out[0] if isinstance(out, tuple) else out, leaves, dout)

    return fwd, fwd_bwd


def _variants(q, k, v, mask, scale, dout, with_flex: bool) -> dict:
    """name -> (forward fn, forward+backward fn) for one mask; ``flex`` variants are functions that
    compile and give ``((forward fn, forward+backward fn), compile seconds)``."""
    from torch.nn.attention import SDPBackend

    out = {
        "triton": _backend_fns(TritonBackend(), q, k, v, mask, scale, dout),
        "fused": _backend_fns(TorchFusedBackend(), q, k, v, mask, scale, dout),
        "auto": _backend_fns(get_backend("auto", q.device, q.dtype), q, k, v, mask, scale, dout),
        "op": _op_fns(q, k, v, mask, scale, dout),
    }
    if mask is None:
        out["sdpa/cudnn"] = _sdpa_fns(q, k, v, scale, dout, SDPBackend.CUDNN_ATTENTION)
        out["sdpa/flash"] = _sdpa_fns(q, k, v, scale, dout, SDPBackend.FLASH_ATTENTION)
        if q.shape[2] != k.shape[2]:
            out["sdpa/cudnn-expanded"] = _expanded_sdpa_fns(q, k, v, scale, dout)
        fa4 = _fa4_fns(q, k, v, scale, dout)
        if fa4 is not None:
            out["flash-attn-4"] = fa4
    if with_flex:
        for name, options in FLEX_BACKENDS.items():
            if options is None or _fa4_available():
                out[name] = lambda options=options: _flex_fns(q, k, v, mask, scale, dout, options)
    return out


SWEEP_FORWARD = [KernelConfig(m, n, w, s) for m, n, w, s in [
    (128, 64, 8, 3), (128, 64, 8, 4), (64, 64, 4, 3), (128, 128, 8, 3), (64, 128, 4, 3),
]]  # fmt: skip
SWEEP_DKDV = [KernelConfig(m, n, w, s) for m, n, w, s in [
    (64, 64, 4, 2), (64, 64, 4, 3), (32, 128, 4, 3), (64, 128, 8, 2), (32, 64, 4, 3), (128, 64, 8, 2),
]]  # fmt: skip
SWEEP_DQ = [KernelConfig(m, n, w, s) for m, n, w, s in [
    (128, 64, 8, 3), (128, 64, 8, 2), (64, 64, 4, 3), (128, 128, 8, 2), (64, 128, 4, 2),
]]  # fmt: skip


def _sweep(q, k, v, mask, scale, iters: int, budget_s: float) -> list[dict]:
    """Time each Triton kernel over a grid of tiles (the split-KV ones also over waves 1, 2, 4)."""
    dout = torch.randn_like(q)
    o, lse = TritonBackend().forward(q, k, v, mask, scale)
    delta = output_delta(dout, o)
    waves = (1.0, 2.0, 4.0)
    grid = [("forward", TritonBackend(forward_tiles=replace(c, waves=w)), c, w) for c in SWEEP_FORWARD for w in waves]
    grid += [("dkdv", TritonBackend(dkdv_tiles=c), c, None) for c in SWEEP_DKDV]
    grid += [("dq", TritonBackend(dq_tiles=replace(c, waves=w)), c, w) for c in SWEEP_DQ for w in waves]
    rows = []
    for kernel, be, cfg, waves in grid:
        if kernel == "forward":
            fn = lambda be=be: be.forward(q, k, v, mask, scale)
        else:  # the other backward kernel runs with its default tiles; the difference is this one's
            fn = lambda be=be: be.backward(dout, q, k, v, lse, delta, mask, scale)
        config = {name: value for name, value in cfg.__dict__.items() if name != "waves"}
        rows.append(dict(kernel=kernel, config=config, waves=waves, ms=_time_ms(fn, iters, budget_s)))
    return rows


def _matmul_tflops(dtype: torch.dtype, n: int = 8192) -> float:
    a, b = torch.randn(n, n, device="cuda", dtype=dtype), torch.randn(n, n, device="cuda", dtype=dtype)
    return 2 * n**3 / _time_ms(lambda: a @ b, 20, 0.5) / 1e9


def _rate(rows: dict, variant: str, mask: str, metric: str) -> float | None:
    row = rows.get((variant, mask))
    return None if row is None or "error" in row else row[f"{metric}_tflops"]


PEERS = ("flex", "flex/fa4", "sdpa/cudnn", "sdpa/flash", "sdpa/cudnn-expanded", "flash-attn-4")


def _best_peer(rows: dict, mask: str) -> tuple[str | None, float | None]:
    """The fastest peer timed on ``mask`` (fwd+bwd) and its rate."""
    rates = [(rate, name) for name in PEERS if (rate := _rate(rows, name, mask, "fwd_bwd")) is not None]
    if not rates:
        return None, None
    rate, name = max(rates)
    return name, rate


def summarize(rows: list[dict]) -> list[dict]:
    """Per shape and mask: ``auto``'s fwd+bwd rate, over unmasked ``auto``, the op over ``auto``,
    the best peer on that mask and ``auto`` over it; the interleaved/all and segments/all times."""
    out = []
    key = lambda r: (r["hq"], r["hkv"], r["sq"], r["skv"])
    for shape, group in itertools.groupby(sorted(rows, key=key), key=key):
        by = {(r["variant"], r["mask"]): r for r in group}
        entry = dict(zip(("hq", "hkv", "sq", "skv"), shape, strict=True))
        unmasked = _rate(by, "auto", "none", "fwd_bwd")
        entry["masks"] = {}
        for mask in MASKS:
            auto, op = (_rate(by, v, mask, "fwd_bwd") for v in ("auto", "op"))
            if auto is None:
                continue
            peer, peer_rate = _best_peer(by, mask)
            entry["masks"][mask] = dict(
                auto_tflops=auto,
                triton_tflops=_rate(by, "triton", mask, "fwd_bwd"),
                fused_tflops=_rate(by, "fused", mask, "fwd_bwd"),
                over_unmasked=auto / unmasked if unmasked else None,
                op_over_auto=op / auto if op else None,
                best_peer=peer,
                best_peer_tflops=peer_rate,
                over_best_peer=auto / peer_rate if peer_rate else None,
            )
        for mask in PARTIAL_MASKS:
            if ("auto", mask) in by and ("auto", "all") in by and "error" not in by["auto", mask]:
                entry[f"{mask}_over_all_time"] = by["auto", mask]["fwd_bwd_ms"] / by["auto", "all"]["fwd_bwd_ms"]
        out.append(entry)
    return out


def _print_summary(summary: list[dict], matmul: float) -> None:
    print(f"\ndense bf16 matmul 8192^3: {matmul:.0f} TFLOP/s (same run); fwd+bwd TFLOP/s of visible work")
    print(f"{'Hq/Hkv':>7}{'Sq':>6}{'Skv':>8}  {'mask':<12}{'auto':>6}{'triton':>7}{'fused':>7}"
          f"{'/unmasked':>10}{'op/auto':>8}  {'best peer':<20}{'auto/peer':>9}")  # fmt: skip
    fmt = lambda x, spec: "-" if x is None else format(x, spec)
    for e in summary:
        head = f"{e['hq']:>4}/{e['hkv']:<2}{e['sq']:>6}{e['skv']:>8}"
        for mask, m in e["masks"].items():
            peer = "-" if m["best_peer"] is None else f"{m['best_peer']} {m['best_peer_tflops']:.0f}"
            print(
                f"{head}  {mask:<12}{fmt(m['auto_tflops'], '6.0f')}{fmt(m['triton_tflops'], '7.0f')}"
                f"{fmt(m['fused_tflops'], '7.0f')}{fmt(m['over_unmasked'], '10.2f')}{fmt(m['op_over_auto'], '8.2f')}"
                f"  {peer:<20}{fmt(m['over_best_peer'], '9.2f')}"
            )
        for mask in PARTIAL_MASKS:
            if f"{mask}_over_all_time" in e:
                print(f"{head}  {mask} time / all time: {e[f'{mask}_over_all_time']:.2f}")


def _peer_versions() -> dict[str, str | None]:
    """Versions of the peer packages this run could import (None: absent)."""
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for package in ("flash-attn-4", "nvidia-cutlass-dsl", "quack-kernels"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = None
    return found


def _run_shape(args, hq, hkv, sq, skv, dtype, wanted) -> list[dict]:
    torch.manual_seed(0)
    q = torch.randn(1, sq, hq, args.head_dim, device="cuda", dtype=dtype)
    k = torch.randn(1, skv, hkv, args.head_dim, device="cuda", dtype=dtype)
    v = torch.randn(1, skv, hkv, args.head_dim, device="cuda", dtype=dtype)
    dout = torch.randn_like(q)
    scale = args.head_dim**-0.5
    rows = []
    for mask_name in args.masks.split(","):
        mask = make_mask(mask_name, sq, skv, q.device)
        pairs = visible_pairs(mask, sq, skv)
        flops = 4 * hq * args.head_dim * pairs
        with_flex = mask_name in args.flex_masks.split(",")
        for name, fns in _variants(q, k, v, mask, scale, dout, with_flex).items():
            if wanted is not None and name not in wanted:
                continue
            base = dict(hq=hq, hkv=hkv, sq=sq, skv=skv, mask=mask_name, variant=name, visible=pairs / (sq * skv))
            try:
                if name in FLEX_BACKENDS:
                    fns, base["compile_s"] = fns()
                t_f, t_fb = (_time_ms(fn, args.iters, args.budget) for fn in fns)
            except Exception as err:  # a kernel that does not take this shape or mask (peers raise their own types)
                if "CUDA error" in str(err) or "out of memory" in str(err):
                    raise  # the context is lost; later numbers would be meaningless
                rows.append({**base, "error": str(err).splitlines()[0][:200]})
                print(
                    f"{hq:>4}/{hkv:<2}{sq:>6}{skv:>8}  {mask_name:<12}{name:<13} unsupported: {rows[-1]['error'][:60]}"
                )
                continue
            row = {**base, "fwd_ms": t_f, "fwd_bwd_ms": t_fb}
            row.update(fwd_tflops=flops / t_f / 1e9, fwd_bwd_tflops=3.5 * flops / t_fb / 1e9)
            rows.append(row)
            print(
                f"{hq:>4}/{hkv:<2}{sq:>6}{skv:>8}  {mask_name:<12}{name:<13}{t_f:>9.3f}{row['fwd_tflops']:>8.0f}"
                f"{t_fb:>9.3f}{row['fwd_bwd_tflops']:>8.0f}"
                + (f"  compile {base['compile_s']:.0f} s" if name in FLEX_BACKENDS else ""),
                flush=True,
            )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="32/8:64:65536,32/8:256:65536,32/8:1024:65536,32/8:4096:65536,"
                        "32/8:64:262144,32/8:1024:262144,16/8:256:32800",
                        help="comma-separated Hq/Hkv:Sq:Skv")  # fmt: skip
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--masks", default=",".join(MASKS), help=f"comma-separated subset of {MASKS}")
    parser.add_argument("--flex-masks", default=",".join(MASKS), help="masks FlexAttention is timed on")
    parser.add_argument("--dtype", choices=("bfloat16", "float16"), default="bfloat16")
    parser.add_argument("--iters", type=int, default=20, help="most timed iterations per measurement")
    parser.add_argument("--budget", type=float, default=0.3, help="seconds of timed iterations per measurement")
    parser.add_argument("--variants", help="comma-separated subset of variants (default: all)")
    parser.add_argument("--sweep", action="store_true", help="time the Triton kernels over tile sizes instead")
    parser.add_argument("--output", help="JSON results file")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_block_attention needs a CUDA device", file=sys.stderr)
        return 2
    dtype = getattr(torch, args.dtype)
    wanted = None if args.variants is None else set(args.variants.split(","))
    shapes = []
    for spec in args.shapes.split(","):
        heads, sq, skv = spec.split(":")
        hq, hkv = (int(x) for x in heads.split("/"))
        shapes.append((hq, hkv, int(sq), int(skv)))
    rows: list[dict] = []
    for hq, hkv, sq, skv in shapes:
        if args.sweep:
            torch.manual_seed(0)
            q = torch.randn(1, sq, hq, args.head_dim, device="cuda", dtype=dtype)
            k, v = (torch.randn(1, skv, hkv, args.head_dim, device="cuda", dtype=dtype) for _ in range(2))
            flops = 4 * hq * sq * skv * args.head_dim
            for mask_name in ("none", "all"):
                for row in _sweep(
                    q, k, v, make_mask(mask_name, sq, skv, q.device), args.head_dim**-0.5, args.iters, args.budget
                ):
                    factor = 1.0 if row["kernel"] == "forward" else 2.5  # backward rows time both kernels
                    row.update(hq=hq, hkv=hkv, sq=sq, skv=skv, mask=mask_name, tflops=factor * flops / row["ms"] / 1e9)
                    rows.append(row)
                    print(
                        f"{hq:>4}/{hkv:<2}{sq:>6}{skv:>8} {mask_name:<5} {row['kernel']:<8}{row['config']!s:<72}"
                        f" waves={row['waves']}  {row['ms']:.3f} ms  {row['tflops']:.0f} TF/s",
                        flush=True,
                    )
        else:
            rows += _run_shape(args, hq, hkv, sq, skv, dtype, wanted)
            if args.output:  # the shapes done so far survive a run stopped later (meta.complete: false)
                _write(args, argv, rows, summarize(rows), None)
        torch.cuda.empty_cache()
    matmul = _matmul_tflops(dtype)
    summary = [] if args.sweep else summarize(rows)
    if summary:
        _print_summary(summary, matmul)
    if args.output:
        _write(args, argv, rows, summary, matmul)
    return 0


def _write(args, argv: list[str] | None, rows: list[dict], summary: list[dict], matmul: float | None) -> None:
    """The results file; ``matmul`` None: written before the run ended (``complete`` false)."""
    extra = {
        "dtype": args.dtype,
        "head_dim": args.head_dim,
        "batch": 1,
        "flops": "4*Hq*d per visible (query, key) pair forward, fwd+bwd 3.5x (sweep backward: 2.5x)",
        "masks": f"see the docstring of tools/bench_block_attention.py ({', '.join(MASKS)})",
        "peers": _peer_versions(),
        "matmul_tflops": matmul,
        "complete": matmul is not None,
    }
    write_results(args.output, "bench_block_attention.py", argv, extra, results=rows, summary=summary)


if __name__ == "__main__":
    sys.exit(main())
