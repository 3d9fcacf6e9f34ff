"""Correctness of what training runs, against float64: block backends, strategies, the megatron layer.

One device, world size 1 (CP 1: the rings degenerate to one block call, which is what is checked;
multi-GPU runs are tools/multi_gpu_check.py). Every case draws fresh random inputs.

- Block cases: ``distributed_cross_attention`` (query ring and KV ring) on each backend against
  the dense float64 reference: the output and ``dq``, ``dk``, ``dv``. Backends: ``fused`` (torch's
  kernels, their own choice) and ``fused-<kernel>`` (one kernel), ``torch``, ``triton`` (our
  kernels) and ``auto`` (the per-block choice training makes). Masks (``--help`` lists them):
  none; ``random`` ids per token; ``tiles``, the models' masks (images as runs of tile ids,
  padding tiles ``-1``, each text token sees the images before it, so the rows before the first
  image see nothing); ``half``, tile ids with each row seeing a random half of the images.
- Layer cases: a megatron-core ``TransformerBlock`` of one gated cross-attention layer
  (``ContextParallelCrossAttention`` with visual K/V recompute, GQA, q/k norms, the ``tiles``
  mask) in the dtype and backend under test against the same weights in float64 (torch backend):
  the output and the gradients of the text input, the visual features and every parameter (the
  scalar gates' separately: in bf16 they are recorded, not judged, see ``UNJUDGED``).

Each error is ``|x - ref| / |ref|`` (Frobenius norms; where the reference is exactly zero, ``|x|``).
A case passes when every error is finite and within its tolerance and the rows that see no
visual token get exactly zero output and ``dq``. Prints a table, writes a JSON results file.

    python tools/gpu_check.py --output benchmarks/results/gpu_check_h200.json
    python tools/gpu_check.py --device cpu      # small shapes; Triton's interpreter runs the kernels
"""

import argparse
import contextlib
import itertools
import os
import socket
import sys
import zlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import torch

# The Triton kernels are defined when lvx_megatron's ops are first imported; without a GPU they can
# only run in Triton's interpreter, which must be switched on before that.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch.distributed as dist

from lvx_megatron.ops import (
    TorchFusedBackend,
    TorchReferenceBackend,
    TritonBackend,
    dense_cross_attention,
    distributed_cross_attention,
    get_backend,
)
from lvx_megatron.ops.backends import BlockAttentionBackend
from lvx_megatron.results import write_results

TOLERANCE = {"bfloat16": 2e-2, "float16": 2e-3, "float32": 1e-4}
# The layer's projections, norms and MLP round to the dtype too (bf16 errors of about 1e-2).
LAYER_TOLERANCE = {"bfloat16": 5e-2, "float32": 1e-4}
# A scalar gate's gradient is one sum over every element of the layer's output, whose terms cancel:
# rounded to bf16 it can be off by as much as its own size, whatever the kernels do. Such errors are
# recorded in bf16 but judged only in fp32, where the same sums keep their precision.
UNJUDGED = {"bfloat16": ("gates_worst",), "float32": ()}
MASKS = ("none", "random", "tiles", "half")
IMAGES, TILES = 3, 4  # the tile masks: images per sample, tiles per image


@dataclass
class BlockCase:
    strategy: str
    backend: str  # "fused" (its own kernel choice), "fused-<kernel>", "torch", "triton" or "auto"
    dtype: str
    hq: int
    hkv: int
    head_dim: int
    sq: int
    skv: int
    mask: str  # one of MASKS


@dataclass
class LayerCase:
    backend: str
    dtype: str
    hidden: int
    heads: int
    groups: int
    visual_hidden: int
    text: int
    visual: int
    batch: int = 2


def relative_error(x: torch.Tensor, ref: torch.Tensor) -> float:
    """``|x - ref| / |ref|`` in float64; ``|x|`` where ``ref`` is all zero; NaN when ``x`` is not finite."""
    x, ref = x.detach().double(), ref.detach().double().to(x.device)
    if not torch.isfinite(x).all():
        return float("nan")
    diff, scale = float((x - ref).norm()), float(ref.norm())
    return diff / scale if scale > 0 else diff


def make_masks(
    kind: str, batch: int, sq: int, skv: int, gen: torch.Generator, device: torch.device
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(q_image_mask [B, Sq, N], kv_image_ids [B, Skv])`` of one mask kind (see the module doc)."""
    if kind == "none":
        return None, None
    first_image = sq // 7  # text before the first image sees nothing
    if kind == "random":
        ids = torch.randint(-1, 5, (batch, skv), generator=gen, device=device)
        q_mask = torch.rand(batch, sq, 5, generator=gen, device=device) < 0.5
        q_mask[:, :first_image] = False
        return q_mask, ids
    # Tile masks: image i's tiles are ids i*TILES .. i*TILES+TILES-1 over runs of keys; an image uses
    # 1..TILES tiles, its unused tiles are padding (-1), as the Mllama processor pads images.
    per_tile = -(-skv // (IMAGES * TILES))
    tile_of_key = torch.arange(skv, device=device) // per_tile
    used_tiles = torch.randint(1, TILES + 1, (batch, IMAGES), generator=gen, device=device)
    tile_used = torch.arange(TILES, device=device) < used_tiles[..., None]  # [B, IMAGES, TILES]
    ids = torch.where(tile_used.flatten(1)[:, tile_of_key], tile_of_key, -1)
    if kind == "tiles":
        image_pos = first_image + torch.arange(IMAGES, device=device) * max(sq - first_image, 1) // IMAGES
        sees_image = torch.arange(sq, device=device)[:, None] >= image_pos  # [Sq, IMAGES]
        sees_image = sees_image.expand(batch, sq, IMAGES)
    elif kind == "half":
        sees_image = torch.rand(batch, sq, IMAGES, generator=gen, device=device) < 0.5
        sees_image[:, :first_image] = False
    else:
        raise ValueError(f"mask must be one of {MASKS}, got {kind!r}")
    q_mask = (sees_image[..., None] & tile_used[:, None]).flatten(2)  # [B, Sq, IMAGES * TILES]
    return q_mask, ids


def blind_rows(q_mask: torch.Tensor | None, ids: torch.Tensor | None, sq: int) -> torch.Tensor | None:
    """``[B, Sq]`` bool: text rows that see no visual token (None without masks)."""
    if ids is None:
        return None
    present = ids >= 0
    if q_mask is None:
        return (~present.any(-1, keepdim=True)).expand(-1, sq)
    visible = q_mask.gather(2, ids.clamp_min(0)[:, None, :].expand(-1, sq, -1)) & present[:, None, :]
    return ~visible.any(-1)


def block_backend(name: str, device: torch.device, dtype: torch.dtype) -> BlockAttentionBackend:
    """The backend a case names: torch (reference), triton, auto, or fused[-<torch kernel>]."""
    if name == "torch":
        return TorchReferenceBackend()
    if name == "triton":
        return TritonBackend()
    if name == "auto":
        return get_backend("auto", device, dtype)
    return TorchFusedBackend(name.split("-")[1] if "-" in name else "auto")


def run_block_case(case: BlockCase, seed: int, device: torch.device, batch: int = 2) -> dict[str, float]:
    """Errors of output and gradients of one block case (fresh inputs from ``seed``)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    dtype = getattr(torch, case.dtype)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, device=device, dtype=torch.float64)

    q = randn(batch, case.sq, case.hq, case.head_dim)
    k = randn(batch, case.skv, case.hkv, case.head_dim)
    v = randn(batch, case.skv, case.hkv, case.head_dim)
    dout = randn(batch, case.sq, case.hq, case.head_dim)
    q_mask, ids = make_masks(case.mask, batch, case.sq, case.skv, gen, device)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = dense_cross_attention(*leaves, None, q_mask, ids)
    ref_grads = torch.autograd.grad(ref, leaves, dout)

    low = [t.to(dtype).requires_grad_() for t in (q, k, v)]
    backend = block_backend(case.backend, device, dtype)
    out = distributed_cross_attention(
        *low, strategy=case.strategy, q_image_mask=q_mask, kv_image_ids=ids, backend=backend
    )
    grads = torch.autograd.grad(out, low, dout.to(dtype))
    errors = {"out": relative_error(out, ref)}
    errors.update({name: relative_error(g, r) for name, g, r in zip(("dq", "dk", "dv"), grads, ref_grads, strict=True)})
    blind = blind_rows(q_mask, ids, case.sq)
    if blind is not None and blind.any():
        worst = torch.maximum(out.detach()[blind].abs().max(), grads[0][blind].abs().max())
        errors["blind_rows_max_abs"] = float(worst)
    return errors


def _fill_weights(block: torch.nn.Module, dtype: torch.dtype) -> None:
    """The same weights in every dtype: drawn in float64 from each parameter's name."""
    with torch.no_grad():
        for name, p in block.named_parameters():
            gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float64)
            p.copy_((1 + 0.1 * noise if "norm" in name else 0.1 * noise).to(dtype))


def _layer_run(case: LayerCase, dtype: torch.dtype, backend: str, data: dict, device: torch.device) -> dict:
    """Forward and backward of the one-layer block; every result as float64."""
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.transformer.transformer_block import TransformerBlock

    from lvx_megatron.core import CrossAttentionMask, cross_attention_decoder_block_spec, llama_style_config

    config = llama_style_config(
        num_layers=1,
        hidden_size=case.hidden,
        num_attention_heads=case.heads,
        num_query_groups=case.groups,
        ffn_hidden_size=2 * case.hidden,
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        cross_attention_layers=[0],
        cross_attention_strategy="query_ring",
        cross_attention_backend=backend,
        recompute_visual_kv=True,
        visual_hidden_size=case.visual_hidden,
        cross_attention_gate_init=0.5,  # the default 0 would cut the attention branch's gradients
    )
    pg = ProcessGroupCollection.use_mpu_process_groups()
    spec = cross_attention_decoder_block_spec(config)
    # post_process=False: no final norm, so the output is the layer's (its blind rows are checked)
    block = TransformerBlock(config, spec=spec, post_process=False, pg_collection=pg).to(device)
    _fill_weights(block, dtype)
    hidden = data["hidden"].to(dtype, copy=True).requires_grad_()
    visual = data["visual"].to(dtype, copy=True).requires_grad_()
    out = block(
        hidden_states=hidden,
        attention_mask=None,
        context=visual,
        context_mask=CrossAttentionMask(data["q_mask"], data["ids"]),
    )
    out.backward(data["dout"].to(dtype))
    result = {"out": out.detach(), "d_hidden": hidden.grad, "d_visual": visual.grad}
    result.update({f"param:{n}": p.grad for n, p in block.named_parameters()})
    return {k: v.double() for k, v in result.items()}


def run_layer_case(case: LayerCase, seed: int, device: torch.device) -> tuple[dict[str, float], str]:
    """Errors of the layer in ``case.dtype`` against float64, and the name of the worst parameter."""
    gen = torch.Generator(device=device).manual_seed(seed)
    b = case.batch
    q_mask, ids = make_masks("tiles", b, case.text, case.visual, gen, device)
    data = {
        "hidden": torch.randn(case.text, b, case.hidden, generator=gen, device=device, dtype=torch.float64),
        "visual": torch.randn(case.visual, b, case.visual_hidden, generator=gen, device=device, dtype=torch.float64),
        "dout": torch.randn(case.text, b, case.hidden, generator=gen, device=device, dtype=torch.float64),
        "q_mask": q_mask,
        "ids": ids,
    }
    ref = _layer_run(case, torch.float64, "torch", data, device)
    run = _layer_run(case, getattr(torch, case.dtype), case.backend, data, device)
    errors = {name: relative_error(run[name], ref[name]) for name in ("out", "d_hidden", "d_visual")}
    params = {name.removeprefix("param:"): relative_error(run[name], ref[name]) for name in ref if ":" in name}
    worst_first = lambda n: params[n] if params[n] == params[n] else float("inf")  # NaN is the worst
    scalars = [n for n in params if ref[f"param:{n}"].numel() == 1]
    worst = max((n for n in params if n not in scalars), key=worst_first)
    errors["params_worst"] = params[worst]
    if scalars:
        errors["gates_worst"] = params[max(scalars, key=worst_first)]
    blind = blind_rows(q_mask, ids, case.text)
    if blind.any():  # Meta's semantics: a row that sees no image gets nothing from the whole layer
        # the layer adds its two gated branches to the residual: the input as the run saw it
        delta = run["out"] - data["hidden"].to(getattr(torch, case.dtype)).double()
        errors["blind_rows_max_abs"] = float(delta.transpose(0, 1)[blind].abs().max())
    return errors, worst


def case_matrix(device: torch.device, quick: bool) -> tuple[list[BlockCase], list[LayerCase]]:
    """The block and layer cases for ``device`` (small shapes on CPU)."""
    if device.type == "cpu":
        blocks = [
            BlockCase(strategy, backend, dtype, hq, hkv, 16, sq, skv, mask)
            for backend, strategy, (hq, hkv), (sq, skv), mask, dtype in itertools.product(
                ("torch", "triton"), ("query_ring", "kv_ring"), [(4, 2)], [(7, 45)], MASKS, ("float32",)
            )
        ]
        blocks += [BlockCase("query_ring", "triton", "float16", 4, 1, 32, 9, 70, mask) for mask in ("none", "tiles")]
        layers = [LayerCase(backend, "float32", 64, 4, 2, 48, 19, 150) for backend in ("torch", "triton")]
        return blocks, layers
    heads = [(32, 8), (8, 8), (8, 1)] if not quick else [(32, 8), (8, 1)]
    dims = [128, 64, 80] if not quick else [128, 80]
    # (517, 2053) at 32/8 packs 2 x 8 x 2068 query rows: large enough for cuDNN's forward.
    lengths = [(67, 1031), (1, 4099), (517, 2053)] if not quick else [(67, 1031), (517, 2053)]
    halves = ("bfloat16", "float16")
    blocks = []
    # torch's kernels behind our GQA packing, unmasked and with a dense bias
    for strategy, (hq, hkv), d, (sq, skv), mask, dtype in itertools.product(
        ("query_ring", "kv_ring"), heads, dims, lengths, ("none", "random"), halves
    ):
        blocks.append(BlockCase(strategy, "fused", dtype, hq, hkv, d, sq, skv, mask))
    # our kernels and training's per-block choice, with every mask kind
    for backend in ("triton", "auto"):
        for (hq, hkv), d, (sq, skv), mask, dtype in itertools.product(heads, dims, lengths, MASKS, halves):
            blocks.append(BlockCase("query_ring", backend, dtype, hq, hkv, d, sq, skv, mask))
        for (sq, skv), mask in itertools.product(lengths, MASKS):
            blocks.append(BlockCase("kv_ring", backend, "bfloat16", 32, 8, 128, sq, skv, mask))
        blocks.append(BlockCase("query_ring", backend, "float32", 32, 8, 128, 67, 1031, "tiles"))
    for strategy in ("query_ring", "kv_ring"):
        for kernel in ("efficient", "flash", "cudnn"):
            blocks.append(BlockCase(strategy, f"fused-{kernel}", "bfloat16", 32, 8, 128, 67, 1031, "none"))
        blocks.append(BlockCase(strategy, "fused", "float32", 32, 8, 128, 67, 1031, "random"))
        blocks.append(BlockCase(strategy, "torch", "bfloat16", 32, 8, 128, 67, 1031, "tiles"))
    # hidden 1024 over 8/2 heads: d 128 as in Llama-3.2-Vision; 3 images x 4 tiles of 257 tokens
    layers = [
        LayerCase(backend, dtype, 1024, 8, 2, 1024, 300, IMAGES * TILES * 257)
        for backend, dtype in itertools.product(("auto", "triton", "fused"), ("bfloat16", "float32"))
    ]
    return blocks, layers


@contextlib.contextmanager
def single_process_megatron(device: torch.device) -> Iterator[None]:
    """A world of one process with megatron's parallel state (TP = CP = PP = 1) for the layer cases."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from lvx_megatron.core.cpu_compat import enable_cpu_compat

    enable_cpu_compat()  # megatron-core without CUDA; does nothing on a GPU machine
    started = not dist.is_initialized()
    if started:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    parallel_state.initialize_model_parallel(1, 1)
    model_parallel_cuda_manual_seed(0)
    try:
        yield
    finally:
        parallel_state.destroy_model_parallel()
        if started:
            dist.destroy_process_group()


def judge(kind: str, case, errors: dict[str, float], tolerance: float, unjudged: tuple[str, ...] = ()) -> dict:
    """The case, its errors, the worst judged one, the tolerance and pass/fail."""
    judged = [v for k, v in errors.items() if k != "blind_rows_max_abs" and k not in unjudged]
    max_error = max(judged, key=lambda e: e if e == e else float("inf"))  # NaN counts as the worst
    blind_ok = errors.get("blind_rows_max_abs", 0.0) == 0.0
    passed = all(e == e and e <= tolerance for e in judged) and blind_ok
    record = {"check": kind, **asdict(case), "errors": errors, "max_error": max_error, "tolerance": tolerance}
    if unjudged:
        record["unjudged"] = [k for k in unjudged if k in errors]
    return {**record, "passed": passed}


def check_all(device: torch.device | None = None, quick: bool = False, layers: bool = True) -> list[dict]:
    """Run the matrix; each record holds its case, errors, worst error, tolerance and pass/fail."""
    device = device or torch.device("cuda")
    block_cases, layer_cases = case_matrix(device, quick)
    records = []
    for i, case in enumerate(block_cases):
        records.append(judge("block", case, run_block_case(case, 1234 + i, device), TOLERANCE[case.dtype]))
    if layers:
        with single_process_megatron(device):
            for i, case in enumerate(layer_cases):
                errors, worst = run_layer_case(case, 4321 + i, device)
                record = judge("layer", case, errors, LAYER_TOLERANCE[case.dtype], UNJUDGED[case.dtype])
                records.append({**record, "worst_param": worst, "recompute_visual_kv": True})
    return records


def _print(records: list[dict]) -> None:
    print(
        f"{'strategy':<11}{'backend':<16}{'dtype':<9}{'Hq/Hkv':>7}{'d':>5}{'Sq':>6}{'Skv':>6}  {'mask':<6}"
        f"{'out':>10}{'dq':>10}{'dk':>10}{'dv':>10}  {'max':>9} {'tol':>7}  ok"
    )
    for r in (r for r in records if r["check"] == "block"):
        e = r["errors"]
        print(
            f"{r['strategy']:<11}{r['backend']:<16}{r['dtype']:<9}{r['hq']:>4}/{r['hkv']:<2}{r['head_dim']:>5}"
            f"{r['sq']:>6}{r['skv']:>6}  {r['mask']:<6}{e['out']:>10.2e}{e['dq']:>10.2e}{e['dk']:>10.2e}"
            f"{e['dv']:>10.2e}  {r['max_error']:>9.2e} {r['tolerance']:>7.0e}  {'yes' if r['passed'] else 'NO'}"
        )
    print(
        f"\n{'layer':<11}{'backend':<16}{'dtype':<9}{'out':>10}{'d_hidden':>10}{'d_visual':>10}{'params':>10}"
        f"{'gates':>10}  {'max':>9} {'tol':>7}  ok  (worst parameter)"
    )
    for r in (r for r in records if r["check"] == "layer"):
        e = r["errors"]
        gates = f"{e['gates_worst']:.2e}" + ("*" if "gates_worst" in r.get("unjudged", ()) else "")
        print(
            f"{'gated':<11}{r['backend']:<16}{r['dtype']:<9}{e['out']:>10.2e}{e['d_hidden']:>10.2e}"
            f"{e['d_visual']:>10.2e}{e['params_worst']:>10.2e}{gates:>10}  {r['max_error']:>9.2e}"
            f" {r['tolerance']:>7.0e}  {'yes' if r['passed'] else 'NO'}  ({r['worst_param']})"
        )
    print("* recorded, not judged (bf16 scalar gate gradients; see UNJUDGED)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", help="JSON results file")
    parser.add_argument("--quick", action="store_true", help="a reduced matrix")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="cpu: small shapes, no fused/auto")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check --device cuda needs a CUDA device (--device cpu runs the small CPU matrix)", file=sys.stderr)
        return 2
    records = check_all(torch.device(args.device), args.quick)
    _print(records)
    failed = sum(not r["passed"] for r in records)
    print(f"{len(records) - failed} passed, {failed} failed")
    if args.output:
        extra = {"tolerance": TOLERANCE, "layer_tolerance": LAYER_TOLERANCE}
        write_results(args.output, "gpu_check.py", argv, extra, results=records)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
