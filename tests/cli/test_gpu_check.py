"""tools/gpu_check.py on CPU: its small matrix (Triton kernels in the interpreter, the megatron layer)
passes, a wrong backend fails it, and the GPU matrix covers what training runs."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from lvx_megatron.ops import TorchReferenceBackend
from tools import gpu_check

REPO = Path(__file__).resolve().parents[2]
CPU = torch.device("cpu")


def test_cpu_matrix_passes_and_records_every_check(tmp_path):
    out = tmp_path / "gpu_check_cpu.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "tools/gpu_check.py"), "--device", "cpu", "--output", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(out.read_text())
    records = data["results"]
    assert all(r["passed"] for r in records)
    for r in records:
        assert r["max_error"] <= r["tolerance"] and r["max_error"] == max(
            v for k, v in r["errors"].items() if k != "blind_rows_max_abs" and k not in r.get("unjudged", ())
        )
    blocks = [r for r in records if r["check"] == "block"]
    assert {r["backend"] for r in blocks} == {"torch", "triton"}
    assert {r["mask"] for r in blocks if r["backend"] == "triton"} == set(gpu_check.MASKS)
    assert {r["strategy"] for r in blocks if r["backend"] == "triton"} == {"query_ring", "kv_ring"}
    # the masked cases have rows that see nothing, and those got exact zeros
    assert all(r["errors"]["blind_rows_max_abs"] == 0.0 for r in blocks if r["mask"] != "none")
    layers = [r for r in records if r["check"] == "layer"]
    assert {r["backend"] for r in layers} == {"torch", "triton"} and all(r["recompute_visual_kv"] for r in layers)
    assert all({"out", "d_hidden", "d_visual", "params_worst", "gates_worst"} <= set(r["errors"]) for r in layers)
    assert data["meta"]["command"] == f"python tools/gpu_check.py --device cpu --output {out}"


class _OffBackend(TorchReferenceBackend):
    """A backend with a small error in every output element, blind rows included."""

    def forward(self, q, k, v, mask, scale):
        o, lse = super().forward(q, k, v, mask, scale)
        return o + 1e-3, lse


def test_a_wrong_backend_fails_the_check(monkeypatch):
    monkeypatch.setattr(gpu_check, "block_backend", lambda name, device, dtype: _OffBackend())
    case = gpu_check.BlockCase("query_ring", "torch", "float32", 4, 2, 16, 7, 45, "tiles")
    errors = gpu_check.run_block_case(case, 0, CPU)
    record = gpu_check.judge("block", case, errors, gpu_check.TOLERANCE["float32"])
    assert not record["passed"] and record["max_error"] > record["tolerance"]
    assert errors["blind_rows_max_abs"] >= 1e-3


def test_relative_error_has_no_floor():
    tiny = torch.full((3, 4), 1e-9, dtype=torch.float64)
    assert abs(gpu_check.relative_error(2 * tiny, tiny) - 1.0) < 1e-12  # a norm floor would hide this
    assert gpu_check.relative_error(tiny, torch.zeros_like(tiny)) > 0  # all-zero reference: absolute
    assert gpu_check.relative_error(torch.full((2,), float("nan")), tiny[0, :2]) != 0  # NaN propagates


def test_tile_masks_look_like_the_models():
    gen = torch.Generator().manual_seed(0)
    sq, skv = 70, 600
    q_mask, ids = gpu_check.make_masks("tiles", 4, sq, skv, gen, CPU)
    n = gpu_check.IMAGES * gpu_check.TILES
    assert q_mask.shape == (4, sq, n) and ids.shape == (4, skv)
    assert (ids == -1).any() and set(ids.unique().tolist()) <= set(range(-1, n))
    runs = (ids[:, 1:] != ids[:, :-1]).sum(1)  # ids come in runs (one per tile), not per token
    assert (runs < n).all()
    blind = gpu_check.blind_rows(q_mask, ids, sq)
    assert blind[:, : sq // 7].all() and not blind[:, -1].any()  # text before the first image sees nothing
    assert (q_mask[:, 1:].long() >= q_mask[:, :-1].long()).all()  # a row sees the images before it
    dense = torch.stack([q_mask[b][:, ids[b].clamp_min(0)] & (ids[b] >= 0) for b in range(4)])
    assert torch.equal(blind, ~dense.any(-1))
    half_mask, _ = gpu_check.make_masks("half", 4, sq, skv, gen, CPU)
    share = half_mask[:, sq // 7 :].float().mean() / q_mask[:, -1].float().mean()
    assert 0.3 < share < 0.7  # about half of what a row could see


def test_gpu_matrix_covers_what_training_runs():
    blocks, layers = gpu_check.case_matrix(torch.device("cuda"), quick=False)
    for backend in ("triton", "auto"):
        mine = [c for c in blocks if c.backend == backend]
        assert {c.mask for c in mine} == set(gpu_check.MASKS)
        assert {c.dtype for c in mine} == {"bfloat16", "float16", "float32"}
        assert {c.strategy for c in mine} == {"query_ring", "kv_ring"}
        assert {(c.hq, c.hkv) for c in mine} == {(32, 8), (8, 8), (8, 1)}
    assert {(c.backend, c.dtype) for c in layers} >= {
        ("auto", "bfloat16"),
        ("triton", "bfloat16"),
        ("fused", "bfloat16"),
    }
    assert all(c.visual >= 1024 and c.hidden // c.heads == 128 for c in layers)
