"""Random sharded cross-attention problems shared by the distributed tests (importable by workers)."""

import itertools
from dataclasses import dataclass

import torch
import torch.distributed as dist

from lvx_megatron.ops import STRATEGIES, dense_cross_attention, distributed_cross_attention


@dataclass(frozen=True)
class Case:
    strategy: str | None  # None: leave the argument out (the library's default)
    hq: int
    hkv: int
    masks: str  # "none", "padding" (ids only) or "images" (ids and per-token visibility)
    dtype: torch.dtype
    seed: int
    batch: int = 2
    head_dim: int = 8
    num_ids: int = 4
    backend: str = "auto"
    head_chunks: int | None = None  # q_allgather's chunks of K/V-head groups (None: by size)


def random_lengths(gen: torch.Generator, world_size: int, low: int, high: int, allow_zero: bool) -> list[int]:
    lens = torch.randint(low, high + 1, (world_size,), generator=gen).tolist()
    if allow_zero and world_size > 1:
        lens[int(torch.randint(0, world_size, (1,), generator=gen))] = 0
    return lens


def make_problem(case: Case, world_size: int):
    """Full float64 tensors, shard lengths, and masks (rows that see nothing included)."""
    batch, head_dim, num_ids = case.batch, case.head_dim, case.num_ids
    gen = torch.Generator().manual_seed(case.seed)
    q_lens = random_lengths(gen, world_size, 1, 6, allow_zero=True)
    kv_lens = random_lengths(gen, world_size, 1, 9, allow_zero=True)
    sq, skv = sum(q_lens), sum(kv_lens)
    q = torch.randn(batch, sq, case.hq, head_dim, generator=gen, dtype=torch.float64)
    k = torch.randn(batch, skv, case.hkv, head_dim, generator=gen, dtype=torch.float64)
    v = torch.randn(batch, skv, case.hkv, head_dim, generator=gen, dtype=torch.float64)
    dout = torch.randn(batch, sq, case.hq, head_dim, generator=gen, dtype=torch.float64)
    q_mask = ids = None
    if case.masks in ("padding", "images"):
        ids = torch.randint(-1, num_ids, (batch, skv), generator=gen)
    if case.masks == "images":
        q_mask = torch.rand(batch, sq, num_ids, generator=gen) < 0.5
        q_mask[:, 0] = False  # a text row that sees nothing
    return dict(q=q, k=k, v=v, dout=dout, q_mask=q_mask, ids=ids, q_lens=q_lens, kv_lens=kv_lens)


def _shard(t: torch.Tensor | None, lens: list[int], rank: int) -> torch.Tensor | None:
    if t is None:
        return None
    start = sum(lens[:rank])
    return t[:, start : start + lens[rank]].contiguous()


def _visibility(prob: dict) -> torch.Tensor:
    """``[B, Sq, Skv]``: text token ``i`` sees visual token ``j`` (the masks' definition, computed here)."""
    (b, sq), skv = prob["q"].shape[:2], prob["k"].shape[1]
    ids, q_mask = prob["ids"], prob["q_mask"]
    if ids is None:
        return torch.ones(b, sq, skv, dtype=torch.bool)
    seen = (ids >= 0)[:, None, :].expand(b, sq, skv)
    if q_mask is None:
        return seen
    return seen & q_mask.gather(2, ids.clamp_min(0)[:, None, :].expand(b, sq, skv))


def _errors(x: torch.Tensor, ref: torch.Tensor, zero: torch.Tensor) -> tuple[float, float]:
    """``(|x - ref| / |ref|`` over the rows whose exact value may be non-zero, the largest ``|x|`` over
    the rows ``zero`` (``[B, S]``) whose exact value is zero): a real relative error, and an absolute
    one only where the reference is legitimately ~0 (there the float64 reference is rounding noise,
    so ``x`` is compared with the exact 0)."""
    x = x.detach().double()
    if not torch.isfinite(x).all():
        return float("inf"), float("inf")
    zero = zero[..., None, None].expand_as(x)
    diff, norm = (x - ref)[~zero].norm(), ref[~zero].norm()
    rel = float(diff / norm) if norm > 0 else (0.0 if diff == 0 else float("inf"))
    return rel, float(x[zero].abs().max()) if zero.any() else 0.0


def _sharded_call(case: Case, prob: dict, rank: int, group, q_lens, kv_lens) -> tuple:
    """This rank's ``q, k, v`` leaves (in ``case.dtype``) and the keyword arguments of its call."""
    q, k, v = (
        _shard(prob[name], lens, rank).to(case.dtype).requires_grad_()
        for name, lens in (("q", q_lens), ("k", kv_lens), ("v", kv_lens))
    )
    kwargs = dict(
        group=group,
        strategy=case.strategy,
        q_image_mask=_shard(prob["q_mask"], q_lens, rank),
        kv_image_ids=_shard(prob["ids"], kv_lens, rank),
        backend=case.backend,
        head_chunks=case.head_chunks,
    )
    if case.strategy is None:
        del kwargs["strategy"]
    return q, k, v, kwargs


def run_case(case: Case, rank: int, world_size: int, group=None, lengths=None) -> dict[str, float]:
    """Errors of this rank's output and gradients against the float64 dense reference (see :func:`_errors`).

    ``lengths`` (``(q_lens, kv_lens)``, same totals) re-splits the random problem over the ranks.
    """
    prob = make_problem(case, world_size)
    q_lens, kv_lens = lengths or (prob["q_lens"], prob["kv_lens"])
    ref_in = [prob[n].clone().requires_grad_() for n in ("q", "k", "v")]
    ref_out = dense_cross_attention(*ref_in, None, prob["q_mask"], prob["ids"])
    ref_grads = torch.autograd.grad(ref_out, ref_in, prob["dout"])

    q, k, v, kwargs = _sharded_call(case, prob, rank, group, q_lens, kv_lens)
    out = distributed_cross_attention(q, k, v, **kwargs)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), _shard(prob["dout"], q_lens, rank).to(case.dtype))
    # Exactly zero: output and gradient of a text row that sees no key (dq also for one key: the
    # softmax gradient vanishes), dK/dV of a key no row sees (dK also when its rows see only it).
    visible = _visibility(prob)
    keys_seen = visible.sum(2)
    blind, single = keys_seen == 0, keys_seen <= 1
    unseen = ~visible.any(1)
    inert = ~(visible & (keys_seen >= 2)[:, :, None]).any(1)
    errs, zero_abs = {}, []
    for name, x, ref, zero, lens in (
        ("out", out, ref_out.detach(), blind, q_lens),
        ("dq", dq, ref_grads[0], single, q_lens),
        ("dk", dk, ref_grads[1], inert, kv_lens),
        ("dv", dv, ref_grads[2], unseen, kv_lens),
    ):
        errs[name], largest = _errors(x, _shard(ref, lens, rank), _shard(zero, lens, rank))
        zero_abs.append(largest)
    # Entries whose exact value is 0, against the same bound as the relative errors (the inputs are O(1)).
    errs["zero_abs"] = max(zero_abs)
    mine = _shard(blind, q_lens, rank)
    if mine.any():  # documented: exactly zero, not merely small
        errs["blind_row_max"] = float(out.detach()[mine].abs().max() + dq[mine].abs().max())
    return errs


def case_matrix(world_size: int) -> list[Case]:
    hq = 8  # GQA ratios 1, 4 and Hq (MQA)
    out = []
    for i, (strategy, hkv, masks, dtype) in enumerate(
        itertools.product(sorted(STRATEGIES), (hq, 2, 1), ("none", "padding", "images"), (torch.float64, torch.float32))
    ):
        out.append(Case(strategy, hq, hkv, masks, dtype, seed=1000 * world_size + i))
    # q_allgather pipelined over head chunks: uneven chunks (8 K/V heads in 3, 2 in 2) and more
    # chunks asked for than there are K/V heads.
    for i, (hkv, chunks, masks, dtype) in enumerate(
        [(8, 3, m, d) for m in ("none", "images") for d in (torch.float64, torch.float32)]
        + [(2, 2, "padding", torch.float64), (2, 3, "images", torch.float32), (1, 4, "images", torch.float64)]
    ):
        out.append(Case("q_allgather", hq, hkv, masks, dtype, seed=1000 * world_size + 500 + i, head_chunks=chunks))
    return out


def run_matrix(rank: int, world_size: int) -> list[tuple[Case, dict[str, float]]]:
    """Worker: every case of the matrix on this rank."""
    # Alternate an explicit group and None (the default group) so both paths are exercised.
    return [
        (case, run_case(case, rank, world_size, dist.group.WORLD if i % 2 else None))
        for i, case in enumerate(case_matrix(world_size))
    ]


def run_default_strategy(rank: int, world_size: int) -> list[tuple[Case, dict[str, float]]]:
    """Worker: calls that name no strategy (unmasked, image masks; GQA; float64 and float32)."""
    cases = [
        Case(None, 8, hkv, masks, dtype, seed=7000 + i)
        for i, (hkv, masks, dtype) in enumerate(
            itertools.product((8, 2), ("none", "images"), (torch.float64, torch.float32))
        )
    ]
    return [(case, run_case(case, rank, world_size, dist.group.WORLD)) for case in cases]


def fuzz_cases(world_size: int, seed: int, count: int) -> list[Case]:
    """``count`` random cases (strategy, GQA ratio, masks, dtype, batch, head dim, ids) from ``seed``."""
    gen = torch.Generator().manual_seed(seed)

    def pick(options):
        return options[int(torch.randint(len(options), (1,), generator=gen))]

    cases = []
    for i in range(count):
        hq = pick([1, 2, 3, 4, 6, 8, 12])
        hkv = pick([g for g in range(1, hq + 1) if hq % g == 0])
        cases.append(
            Case(
                strategy=pick(sorted(STRATEGIES)),
                hq=hq,
                hkv=hkv,
                masks=pick(["none", "padding", "images"]),
                dtype=pick([torch.float64, torch.float32]),
                seed=seed * 1000 + world_size * 100 + i,
                batch=pick([1, 2, 3]),
                head_dim=pick([4, 8, 16, 32]),
                num_ids=pick([1, 3, 7]),
                head_chunks=pick([None, 1, 2, 3]),
            )
        )
    return cases


def run_fuzz(rank: int, world_size: int, seed: int, count: int) -> list[tuple[Case, dict[str, float]]]:
    """Worker: ``count`` random cases on this rank."""
    return [(case, run_case(case, rank, world_size)) for case in fuzz_cases(world_size, seed, count)]


def counted_bytes(case: Case, rank: int, world_size: int, group=None):
    """Run ``case`` once forward and backward, counting bytes, with the mask planned beforehand as
    models do: ``(plan CommStats, fwd CommStats, bwd CommStats, CallShape)``."""
    from lvx_megatron.ops import MaskPlan, count_communication
    from lvx_megatron.ops.cost_model import CallShape
    from lvx_megatron.ops.groups import HierarchicalGroups

    prob = make_problem(case, world_size)
    q_lens, kv_lens, dtype = prob["q_lens"], prob["kv_lens"], case.dtype
    q, k, v, kwargs = _sharded_call(case, prob, rank, group, q_lens, kv_lens)
    q_mask, ids = kwargs.pop("q_image_mask"), kwargs.pop("kv_image_ids")
    with count_communication() as plan:
        if ids is not None:
            flat = group.parent if isinstance(group, HierarchicalGroups) else group
            kwargs["mask_plan"] = MaskPlan.build(q_mask, ids, flat, num_queries=q.shape[1])
    with count_communication() as fwd:
        out = distributed_cross_attention(q, k, v, **kwargs)
    with count_communication() as bwd:
        out.backward(_shard(prob["dout"], q_lens, rank).to(dtype))
    shape = CallShape(
        q_lens=tuple(q_lens),
        kv_lens=tuple(kv_lens),
        batch=case.batch,
        q_heads=case.hq,
        kv_heads=case.hkv,
        head_dim=case.head_dim,
        elem_bytes=torch.finfo(dtype).bits // 8,
        acc_bytes=8 if dtype == torch.float64 else 4,
        head_chunks=case.head_chunks,
    )
    return plan, fwd, bwd, shape


def measured_and_predicted_bytes(rank: int, world_size: int, seed: int) -> list[tuple[Case, tuple, tuple]]:
    """Worker: per strategy and mask kind, counted (plan, fwd, bwd) bytes and the cost model's prediction."""
    from lvx_megatron.ops.auto import predicted_bytes
    from lvx_megatron.ops.cost_model import predicted_plan_bytes

    cases = [
        Case(strategy, 8, 2, masks, dtype, seed=seed + i, num_ids=3)
        for i, (strategy, masks, dtype) in enumerate(
            itertools.product(sorted(STRATEGIES), ("none", "padding", "images"), (torch.float32, torch.float64))
        )
    ]
    # q_allgather in head chunks: one LSE all-reduce per chunk (8 query heads as 4 + 2 + 2).
    cases += [
        Case("q_allgather", 8, 4, masks, torch.float32, seed=seed + 100 + i, num_ids=3, head_chunks=3)
        for i, masks in enumerate(("none", "images"))
    ]
    rows = []
    for case in cases:
        plan, fwd, bwd, shape = counted_bytes(case, rank, world_size)
        num_ids = case.num_ids if case.masks == "images" else 0
        plan_bytes = (
            0 if case.masks == "none" else predicted_plan_bytes(shape.q_lens, shape.kv_lens, case.batch, num_ids, rank)
        )
        predicted = (plan_bytes, *predicted_bytes(case.strategy, shape, rank))
        rows.append((case, (plan.bytes_sent, fwd.bytes_sent, bwd.bytes_sent), predicted))
    return rows


def auto_choice(rank: int, world_size: int, text: int, visual: int) -> str:
    """Worker: the strategy ``auto`` picks for a call with ``text`` queries and ``visual`` keys (split)."""
    from lvx_megatron.ops.auto import choose_for_call
    from lvx_megatron.ops.cost_model import uniform_lengths

    q = torch.zeros(1, uniform_lengths(text, world_size)[rank], 8, 16)
    kv_shape = (1, uniform_lengths(visual, world_size)[rank], 2, 16)
    return choose_for_call(q, kv_shape, group=dist.group.WORLD)[0]
