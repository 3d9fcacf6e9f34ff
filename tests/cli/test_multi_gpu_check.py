"""The multi-GPU check script runs end to end on CPU ranks (gloo), so it is ready for a GPU host, and
reports what it measured: correct results, and the bytes the cost model predicts."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lvx_megatron.ops import STRATEGIES
from lvx_megatron.ops.auto import CPU_RATE, DEFAULT_LINKS, predict, predicted_bytes
from lvx_megatron.ops.cost_model import CallShape, ComputeModel, uniform_lengths

REPO = Path(__file__).resolve().parents[2]


def test_multi_gpu_check_on_two_cpu_ranks(tmp_path):
    out = tmp_path / "results.json"
    torchrun = Path(sys.executable).with_name("torchrun")
    proc = subprocess.run(
        [
            str(torchrun),
            "--nproc-per-node",
            "2",
            str(REPO / "tools/multi_gpu_check.py"),
            "--quick",
            "--repeats",
            "1",
            "--output",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    results = json.loads(out.read_text())
    assert results["correctness_passed"] and results["meta"]["world_size"] == 2
    # Every strategy on the one group size two ranks allow, within fp32 rounding of float64.
    checked = sorted((r["group_size"], r["strategy"]) for r in results["correctness"])
    assert checked == [(2, s) for s in sorted(STRATEGIES)]
    assert all(r["max_rel_error"] < 1e-5 for r in results["correctness"]), results["correctness"]
    # Part 3 (--quick: 64 text tokens against one frame, 32/8 heads, d 128, fp32 on 2 gloo ranks):
    # each rank sent what the cost model predicts, and the tool reports the cost model's time.
    shape = CallShape(uniform_lengths(64, 2), uniform_lengths(6404, 2), 1, 32, 8, 128, elem_bytes=4)
    rows = {r["strategy"]: r for r in results["strategies"]}
    assert sorted(rows) == sorted(STRATEGIES)
    for name, row in rows.items():
        assert row["bytes_sent"] == row["predicted_bytes"] == [sum(predicted_bytes(name, shape, r)) for r in (0, 1)]
        assert row["bytes_sent"][0] > 0
        expected = predict(name, shape, DEFAULT_LINKS["gloo"], ComputeModel(flat=CPU_RATE)).total_s
        assert row["predicted_s"] == pytest.approx(expected, rel=1e-12), name
