"""GPU correctness of the block backends and both strategies against a float64 reference.

Runs on one CUDA device (world size 1: the ring degenerates to the plain block kernel, which is
what is checked here; multi-GPU runs are tools/ of the multi-GPU work). Every case draws fresh
random inputs, compares output and dq/dk/dv with the float64 dense reference by
``|x - ref| / |ref|``, fails on NaN, prints a table and writes a JSON results file.

    python tools/gpu_check.py --output benchmarks/results/gpu_check_h100.json
"""

import argparse
import itertools
import sys
from dataclasses import asdict, dataclass

import torch
from results_file import write_results

from lvx_megatron.ops import (
    TorchFusedBackend,
    TorchReferenceBackend,
    dense_cross_attention,
    distributed_cross_attention,
)

TOLERANCE = {torch.bfloat16: 2e-2, torch.float16: 2e-3, torch.float32: 1e-4}


@dataclass
class GpuCase:
    strategy: str
    backend: str  # "fused" (auto), "fused-<kernel>" or "torch"
    dtype: str
    hq: int
    hkv: int
    head_dim: int
    sq: int
    skv: int
    masks: bool


def _backend(name: str):
    if name == "torch":
        return TorchReferenceBackend()
    return TorchFusedBackend(name.split("-")[1] if "-" in name else "auto")


def _rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    x = x.detach().double()
    if not torch.isfinite(x).all():
        return float("nan")
    return float((x - ref).norm() / ref.norm().clamp_min(1e-12))


def run_case(case: GpuCase, seed: int, batch: int = 2, num_ids: int = 5) -> dict[str, float]:
    """Relative errors of output and gradients for one case (fresh inputs from ``seed``)."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    dev, dtype = torch.device("cuda"), getattr(torch, case.dtype)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, device=dev, dtype=torch.float64)

    q = randn(batch, case.sq, case.hq, case.head_dim)
    k = randn(batch, case.skv, case.hkv, case.head_dim)
    v = randn(batch, case.skv, case.hkv, case.head_dim)
    dout = randn(batch, case.sq, case.hq, case.head_dim)
    q_mask = ids = None
    if case.masks:
        ids = torch.randint(-1, num_ids, (batch, case.skv), generator=gen, device=dev)
        q_mask = torch.rand(batch, case.sq, num_ids, generator=gen, device=dev) < 0.5
        q_mask[:, : case.sq // 7] = False  # text before the first image sees nothing
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = dense_cross_attention(*leaves, None, q_mask, ids)
    ref_grads = torch.autograd.grad(ref, leaves, dout)

    low = [t.to(dtype).requires_grad_() for t in (q, k, v)]
    out = distributed_cross_attention(
        *low, strategy=case.strategy, q_image_mask=q_mask, kv_image_ids=ids, backend=_backend(case.backend)
    )
    grads = torch.autograd.grad(out, low, dout.to(dtype))
    errs = {"out": _rel(out, ref.detach())}
    errs.update({name: _rel(g, r) for name, g, r in zip(("dq", "dk", "dv"), grads, ref_grads, strict=True)})
    blind = None if q_mask is None else ~(q_mask.any(-1))
    if blind is not None and blind.any():
        errs["blind_rows_abs"] = float(out[blind].abs().max().item() + grads[0][blind].abs().max().item())
    return errs


def case_matrix(quick: bool) -> list[GpuCase]:
    cases = []
    heads = [(32, 8), (8, 8), (8, 1)]
    dims = [128, 64, 80]
    # (517, 2053) at 32/8 packs 2 x 8 x 2068 query rows: large enough for cuDNN's forward.
    lengths = [(67, 1031), (1, 4099), (517, 2053)] if not quick else [(67, 1031), (517, 2053)]
    for strategy, (hq, hkv), d, (sq, skv), masks in itertools.product(
        ("query_ring", "kv_ring"), heads, dims, lengths, (False, True)
    ):
        for dtype in ("bfloat16", "float16"):
            cases.append(GpuCase(strategy, "fused", dtype, hq, hkv, d, sq, skv, masks))
    for strategy in ("query_ring", "kv_ring"):
        for kernel in ("efficient", "flash", "cudnn"):
            cases.append(GpuCase(strategy, f"fused-{kernel}", "bfloat16", 32, 8, 128, 67, 1031, False))
        cases.append(GpuCase(strategy, "fused", "float32", 32, 8, 128, 67, 1031, True))
        cases.append(GpuCase(strategy, "torch", "bfloat16", 32, 8, 128, 67, 1031, True))
    return cases


def check_all(quick: bool = False) -> list[dict]:
    """Run the matrix; each record holds the case, its errors, the tolerance and pass/fail."""
    records = []
    for i, case in enumerate(case_matrix(quick)):
        errs = run_case(case, seed=1234 + i)
        tol = TOLERANCE[getattr(torch, case.dtype)]
        ok = all(
            (err == 0.0) if name == "blind_rows_abs" else (err == err and err <= tol) for name, err in errs.items()
        )
        records.append({**asdict(case), "errors": errs, "tolerance": tol, "passed": ok})
    return records


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", help="JSON results file")
    parser.add_argument("--quick", action="store_true", help="a reduced matrix")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_check needs a CUDA device", file=sys.stderr)
        return 2
    records = check_all(args.quick)
    print(
        f"{'strategy':<11}{'backend':<16}{'dtype':<9}{'Hq/Hkv':>7}{'d':>5}{'Sq':>6}{'Skv':>6}{'mask':>6}"
        f"{'out':>10}{'dq':>10}{'dk':>10}{'dv':>10}  ok"
    )
    for r in records:
        e = r["errors"]
        print(
            f"{r['strategy']:<11}{r['backend']:<16}{r['dtype']:<9}{r['hq']:>4}/{r['hkv']:<2}{r['head_dim']:>5}"
            f"{r['sq']:>6}{r['skv']:>6}{r['masks']!s:>6}{e['out']:>10.2e}{e['dq']:>10.2e}{e['dk']:>10.2e}"
            f"{e['dv']:>10.2e}  {'yes' if r['passed'] else 'NO'}"
        )
    failed = sum(not r["passed"] for r in records)
    print(f"{len(records) - failed} passed, {failed} failed")
    if args.output:
        write_results(args.output, "gpu_check.py", argv, {}, results=records)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
