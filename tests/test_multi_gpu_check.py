"""The multi-GPU check script runs end to end on CPU ranks (gloo), so it is ready for a GPU host."""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


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
    assert {row["strategy"] for row in results["strategies"]} == {
        "query_ring",
        "kv_ring",
        "q_allgather",
        "kv_allgather",
    }
    assert results["overlap"]["ring_s"] > 0 and results["overlap"]["compute_only_s"] > 0
