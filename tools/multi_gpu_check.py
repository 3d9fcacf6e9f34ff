"""Multi-GPU check of the distributed ops: NCCL correctness, ring overlap, strategy timings.

    torchrun --nproc-per-node 8 tools/multi_gpu_check.py --output benchmarks/results/multi_gpu_h200x8.json
    torchrun --nproc-per-node 3 tools/multi_gpu_check.py --quick        # CPU over gloo: the same code paths

1. Correctness: every strategy on groups of 2, 3, 4, 5 and 8 ranks (those the world allows)
   against the float64 reference (bf16 on GPUs, fp32 on CPU), with image masks.
2. Overlap: the query ring's forward+backward time against the compute-only time of the same
   block pairs (no communication) at a long visual length.
3. Llama-3.2-11B-Vision cross-attention shapes (32/8 heads, d 128, 6404 visual tokens per frame):
   forward+backward time of every strategy beside the cost model's prediction, and the bytes each
   rank sent beside the bytes the cost model predicts for it.
Rank 0 prints one table per part and writes everything to ``--output`` (with device and versions).
"""

import argparse
import statistics
import sys
import time

import torch
import torch.distributed as dist

from lvx_megatron.ops import STRATEGIES, count_communication, dense_cross_attention, distributed_cross_attention
from lvx_megatron.ops.auto import choose_for_call, predicted_bytes
from lvx_megatron.ops.backends import get_backend
from lvx_megatron.ops.cost_model import CallShape, uniform_lengths
from lvx_megatron.results import write_results

TOLERANCE = {torch.bfloat16: 3e-2, torch.float32: 1e-5}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device: torch.device, repeats: int) -> float:
    """Median seconds of ``fn()`` after one warm-up, synchronised across the world."""
    fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        dist.barrier()
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _shard(t: torch.Tensor, lens: tuple[int, ...], rank: int) -> torch.Tensor:
    start = sum(lens[:rank])
    return t[:, start : start + lens[rank]]


def correctness(device, dtype, sizes: list[int], seed: int = 0) -> list[dict]:
    """Every strategy on the first ``g`` ranks for each group size ``g`` against float64."""
    rank, rows = dist.get_rank(), []
    for g in sizes:
        group = dist.new_group(list(range(g)))
        if rank >= g:
            continue
        gen = torch.Generator().manual_seed(seed + g)
        q_lens, kv_lens = uniform_lengths(96 + g, g), uniform_lengths(700 + 13 * g, g)
        q = torch.randn(2, sum(q_lens), 8, 64, generator=gen, dtype=torch.float64)
        k, v = (torch.randn(2, sum(kv_lens), 2, 64, generator=gen, dtype=torch.float64) for _ in range(2))
        dout = torch.randn(q.shape, generator=gen, dtype=torch.float64)
        q_mask = torch.rand(2, sum(q_lens), 4, generator=gen) < 0.6
        q_mask[:, :3] = False  # text before the first image
        ids = torch.randint(-1, 4, (2, sum(kv_lens)), generator=gen)
        ref_in = [t.clone().requires_grad_() for t in (q, k, v)]
        ref = dense_cross_attention(*ref_in, None, q_mask, ids)
        ref_grads = torch.autograd.grad(ref, ref_in, dout)
        for strategy in sorted(STRATEGIES):
            local = [
                _shard(t, lens, rank).to(device, dtype).requires_grad_()
                for t, lens in ((q, q_lens), (k, kv_lens), (v, kv_lens))
            ]
            out = distributed_cross_attention(
                *local,
                group=group,
                strategy=strategy,
                q_image_mask=_shard(q_mask, q_lens, rank).to(device),
                kv_image_ids=_shard(ids, kv_lens, rank).to(device),
            )
            grads = torch.autograd.grad(out, local, _shard(dout, q_lens, rank).to(device, dtype))
            refs = [_shard(ref.detach(), q_lens, rank)] + [
                _shard(g_, lens, rank) for g_, lens in zip(ref_grads, (q_lens, kv_lens, kv_lens), strict=True)
            ]
            # No shard's reference is ~0: every shard holds rows and keys that see several keys/rows.
            errors = [float((x.double().cpu() - r).norm() / r.norm()) for x, r in zip([out, *grads], refs, strict=True)]
            worst = torch.tensor([max(errors)], dtype=torch.float64)
            dist.all_reduce(worst, op=dist.ReduceOp.MAX, group=group)
            rows.append({"group_size": g, "strategy": strategy, "max_rel_error": float(worst)})
    return rows


HEADS = {"q_heads": 32, "kv_heads": 8, "head_dim": 128}


def _problem(device, dtype, text: int, visual: int):
    rank, world = dist.get_rank(), dist.get_world_size()
    sq, skv = uniform_lengths(text, world)[rank], uniform_lengths(visual, world)[rank]
    make = lambda s, h: torch.randn(1, s, h, HEADS["head_dim"], device=device, dtype=dtype, requires_grad=True)
    return make(sq, HEADS["q_heads"]), make(skv, HEADS["kv_heads"]), make(skv, HEADS["kv_heads"])


def _fwd_bwd(q, k, v, strategy: str):
    out = distributed_cross_attention(q, k, v, strategy=strategy)
    out.backward(torch.ones_like(out))


def overlap(device, dtype, text: int, visual: int, repeats: int) -> dict:
    """Query ring time vs the compute-only time of its ``n`` block pairs."""
    world = dist.get_world_size()
    q, k, v = _problem(device, dtype, text, visual)
    ring = _timed(lambda: _fwd_bwd(q, k, v, "query_ring"), device, repeats)
    backend = get_backend("auto", device, dtype)
    qd, kd, vd = (t.detach() for t in (q, k, v))
    lse_shape = (qd.shape[0], qd.shape[1], qd.shape[2])

    def compute_only():
        for _ in range(world):
            o, lse = backend.forward(qd, kd, vd, None, qd.shape[-1] ** -0.5)
            delta = torch.zeros(lse_shape, device=device, dtype=torch.float32)
            backend.backward(torch.ones_like(o), qd, kd, vd, lse, delta, None, qd.shape[-1] ** -0.5)

    compute = _timed(compute_only, device, repeats)
    return {"text": text, "visual": visual, "ring_s": ring, "compute_only_s": compute, "overhead": ring / compute - 1}


def strategies(device, dtype, text: int, frames: int, repeats: int) -> list[dict]:
    """Measured forward+backward seconds of every strategy beside the cost model's prediction, and
    the bytes every rank sent in one forward+backward beside its predicted bytes."""
    visual, world = frames * 6404, dist.get_world_size()
    q, k, v = _problem(device, dtype, text, visual)
    _, predictions = choose_for_call(q.detach(), tuple(k.shape), group=None)
    shape = CallShape(
        uniform_lengths(text, world), uniform_lengths(visual, world), 1, **HEADS, elem_bytes=q.element_size()
    )
    rows = []
    for strategy in sorted(STRATEGIES):
        seconds = _timed(lambda s=strategy: _fwd_bwd(q, k, v, s), device, repeats)
        with count_communication() as counted:
            _fwd_bwd(q, k, v, strategy)
        sent = [None] * world
        dist.all_gather_object(sent, counted.bytes_sent)
        rows.append(
            {
                "text": text,
                "frames": frames,
                "strategy": strategy,
                "measured_s": seconds,
                "predicted_s": predictions[strategy].total_s,
                "bytes_sent": sent,
                "predicted_bytes": [sum(predicted_bytes(strategy, shape, r)) for r in range(world)],
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", help="results JSON (rank 0 writes it)")
    parser.add_argument("--quick", action="store_true", help="small shapes (CPU smoke run)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(__import__("os").environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    world, rank = dist.get_world_size(), dist.get_rank()
    sizes = [g for g in (2, 3, 4, 5, 8) if g <= world]
    check = correctness(device, dtype, sizes)
    passed = all(row["max_rel_error"] <= TOLERANCE[dtype] for row in check)
    if args.quick:
        over = overlap(device, dtype, 64, 4096, args.repeats)
        timings = strategies(device, dtype, 64, 1, args.repeats)
    else:
        over = overlap(device, dtype, 1024, 128 * 6404, args.repeats)
        timings = [
            row
            for text in (1024, 4096)
            for f in (8, 64, 256)
            for row in strategies(device, dtype, text, f, args.repeats)
        ]
    if rank == 0:
        print(f"1. correctness ({dtype}, tolerance {TOLERANCE[dtype]}): {'all pass' if passed else 'FAILURES'}")
        for row in check:
            print(f"   group {row['group_size']}  {row['strategy']:<13} max rel error {row['max_rel_error']:.3g}")
        print(
            f"2. overlap: query ring {over['ring_s'] * 1e3:.2f} ms vs compute only "
            f"{over['compute_only_s'] * 1e3:.2f} ms ({over['overhead'] * 100:+.1f}%) at {over['visual']} visual tokens"
        )
        print("3. text  frames  strategy       measured ms  predicted ms  bytes sent (rank 0)")
        for row in timings:
            bytes_ok = "as predicted" if row["bytes_sent"] == row["predicted_bytes"] else "NOT as predicted"
            print(
                f"   {row['text']:>5}  {row['frames']:>6}  {row['strategy']:<13} {row['measured_s'] * 1e3:11.2f}  "
                f"{row['predicted_s'] * 1e3:12.2f}  {row['bytes_sent'][0]} ({bytes_ok})"
            )
        if args.output:
            write_results(
                args.output,
                "multi_gpu_check.py",
                None,
                {"world_size": world, "dtype": str(dtype)},
                correctness=check,
                correctness_passed=passed,
                overlap=over,
                strategies=timings,
            )
    dist.destroy_process_group()
    if not passed:
        sys.exit(1)


if __name__ == "__main__":
    main()
