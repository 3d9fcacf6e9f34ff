"""CPU demo of the distributed cross-attention ops: exactness and bytes moved per strategy.

Spawns ``--world-size`` processes joined over gloo. Each holds a text shard and an uneven share
of the frames of a synthetic video (visual tokens tagged with their frame id; each text token
sees the frames before it, the first text tokens see none), runs every strategy forward and
backward, and compares its rows and gradients with a float64 dense reference.

    python -m lvx_megatron.demo --world-size 4
"""

import argparse
import time

import torch
import torch.distributed as dist

from .launch import spawn_gloo
from .ops import STRATEGIES, count_communication, dense_cross_attention, distributed_cross_attention


def _split(total: int, world_size: int, gen: torch.Generator) -> list[int]:
    """Uneven split of ``total`` into ``world_size`` parts (some may be empty)."""
    cuts = torch.randint(0, total + 1, (world_size - 1,), generator=gen).sort().values.tolist()
    bounds = [0, *cuts, total]
    return [bounds[i + 1] - bounds[i] for i in range(world_size)]


def make_video_problem(args: argparse.Namespace, world_size: int) -> dict:
    """Full float64 inputs of one synthetic sample and the per-rank shard lengths."""
    gen = torch.Generator().manual_seed(args.seed)
    sq, skv = args.text_tokens, args.frames * args.tokens_per_frame
    q = torch.randn(1, sq, args.q_heads, args.head_dim, generator=gen, dtype=torch.float64)
    k = torch.randn(1, skv, args.kv_heads, args.head_dim, generator=gen, dtype=torch.float64)
    v = torch.randn(1, skv, args.kv_heads, args.head_dim, generator=gen, dtype=torch.float64)
    dout = torch.randn(1, sq, args.q_heads, args.head_dim, generator=gen, dtype=torch.float64)
    ids = torch.arange(args.frames).repeat_interleave(args.tokens_per_frame)[None]
    # Text token i sees the frames shown before it; the first tokens precede every frame.
    frames_seen = (torch.arange(sq) * (args.frames + 1)) // sq
    q_mask = (torch.arange(args.frames)[None, :] < frames_seen[:, None])[None]
    q_lens, kv_lens = _split(sq, world_size, gen), _split(skv, world_size, gen)
    return dict(q=q, k=k, v=v, dout=dout, ids=ids, q_mask=q_mask, q_lens=q_lens, kv_lens=kv_lens)


def _rows(t: torch.Tensor, lens: list[int], rank: int) -> torch.Tensor:
    start = sum(lens[:rank])
    return t[:, start : start + lens[rank]]


def _worker(rank: int, world_size: int, args: argparse.Namespace) -> list[dict] | None:
    prob = make_video_problem(args, world_size)
    dtype = getattr(torch, args.dtype)
    leaves = [prob[n].clone().requires_grad_() for n in ("q", "k", "v")]
    ref = dense_cross_attention(*leaves, None, prob["q_mask"], prob["ids"])
    ref_grads = torch.autograd.grad(ref, leaves, prob["dout"])
    ql, kl = prob["q_lens"], prob["kv_lens"]
    rows = []
    for strategy in STRATEGIES:
        q = _rows(prob["q"], ql, rank).to(dtype).requires_grad_()
        k = _rows(prob["k"], kl, rank).to(dtype).requires_grad_()
        v = _rows(prob["v"], kl, rank).to(dtype).requires_grad_()
        dist.barrier()
        start = time.perf_counter()
        with count_communication() as fwd:
            out = distributed_cross_attention(
                q,
                k,
                v,
                strategy=strategy,
                q_image_mask=_rows(prob["q_mask"], ql, rank),
                kv_image_ids=_rows(prob["ids"], kl, rank),
            )
        with count_communication() as bwd:
            out.backward(_rows(prob["dout"], ql, rank).to(dtype))
        elapsed = time.perf_counter() - start
        errs = [
            (got.detach().double() - _rows(want, lens, rank)).abs().max().item() if got.numel() else 0.0
            for got, want, lens in (
                (out, ref.detach(), ql),
                (q.grad, ref_grads[0], ql),
                (k.grad, ref_grads[1], kl),
                (v.grad, ref_grads[2], kl),
            )
        ]
        stats = torch.tensor([*errs, fwd.bytes_sent, bwd.bytes_sent, elapsed], dtype=torch.float64)
        dist.all_reduce(stats, op=dist.ReduceOp.MAX)
        rows.append(
            dict(
                strategy=strategy,
                err=stats[:4].tolist(),
                fwd_bytes=int(stats[4]),
                bwd_bytes=int(stats[5]),
                seconds=stats[6].item(),
            )
        )
    return rows if rank == 0 else None


def format_report(args: argparse.Namespace, world_size: int, rows: list[dict]) -> str:
    """The demo's table: errors vs the float64 reference, bytes per rank, time."""
    skv = args.frames * args.tokens_per_frame
    lines = [
        f"cross-attention: {args.text_tokens} text tokens x {skv} visual tokens ({args.frames} frames), "
        f"Hq/Hkv={args.q_heads}/{args.kv_heads}, d={args.head_dim}, {args.dtype}, "
        f"{world_size} gloo ranks (uneven shards)",
        f"{'strategy':<12} {'max|err| out':>12} {'dq':>9} {'dk':>9} {'dv':>9} "
        f"{'fwd MB/rank':>12} {'bwd MB/rank':>12} {'ms':>8}",
    ]
    for r in rows:
        e = r["err"]
        lines.append(
            f"{r['strategy']:<12} {e[0]:>12.2e} {e[1]:>9.2e} {e[2]:>9.2e} {e[3]:>9.2e} "
            f"{r['fwd_bytes'] / 1e6:>12.3f} {r['bwd_bytes'] / 1e6:>12.3f} {r['seconds'] * 1e3:>8.1f}"
        )
    by = {r["strategy"]: r["fwd_bytes"] + r["bwd_bytes"] for r in rows}
    if by.get("query_ring") and by.get("kv_ring"):
        lines.append(f"query ring moves {by['kv_ring'] / by['query_ring']:.1f}x fewer bytes per rank than the KV ring")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world-size", type=int, default=4, help="gloo processes (default 4)")
    parser.add_argument("--text-tokens", type=int, default=96)
    parser.add_argument("--frames", type=int, default=6)
    parser.add_argument("--tokens-per-frame", type=int, default=256)
    parser.add_argument("--q-heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=32)
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for name in ("world_size", "text_tokens", "frames", "tokens_per_frame", "q_heads", "kv_heads", "head_dim"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.q_heads % args.kv_heads:
        parser.error(f"--q-heads ({args.q_heads}) must be a multiple of --kv-heads ({args.kv_heads})")
    return args


def main(argv: list[str] | None = None) -> str:
    args = parse_args(argv)
    print(f"spawning {args.world_size} gloo ranks ...", flush=True)
    report = format_report(args, args.world_size, spawn_gloo(args.world_size, _worker, args)[0])
    print(report, flush=True)
    return report


if __name__ == "__main__":
    main()
