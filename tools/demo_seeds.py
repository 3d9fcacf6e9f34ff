"""Run the demo (``make demo``'s command) once per seed and record what each run reached.

    python tools/demo_seeds.py --seeds 1234 1 2 --output benchmarks/results/demo_seeds_cpu.json

Each seed trains from scratch into ``runs/demo-seed-<seed>`` (removed first; the generated data is
shared). The results file holds, per seed: the final held-out accuracy per question type, the same
model with the frames blanked (no vision), chance, the run's wall time and the spread of its step
times; README's demo section is rendered from it (``tools/render_results.py``).
"""

import argparse
import contextlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from lvx_megatron.data.video_qa import chance_accuracy, chance_by_type
from lvx_megatron.results import write_results

REPO = Path(__file__).resolve().parents[1]


def cpu_model() -> str:
    """The CPU's model name (Linux), so a wall time names the machine it was measured on."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def run_seed(config: str, seed: int, nproc: int) -> dict:
    """Train the demo with ``seed`` into its own folder; the final eval record, step times, wall time."""
    run_dir = REPO / "runs" / f"demo-seed-{seed}"
    shutil.rmtree(run_dir, ignore_errors=True)
    cmd = [
        sys.executable, "-m", "lvx_megatron.torchrun", f"--nproc-per-node={nproc}", "pretrain_mllm.py",
        "--config", config, "--seed", str(seed), "--save", str(run_dir), "--load", str(run_dir),
    ]  # fmt: skip
    print(f"seed {seed}: {' '.join(cmd[1:])}", flush=True)
    start = time.perf_counter()
    subprocess.run(cmd, cwd=REPO, check=True)
    wall_s = time.perf_counter() - start
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if r["kind"] == "eval"]
    steps = sorted(r["step_s"] for r in records if r["kind"] == "train" and "step_s" in r)
    if not evals or not steps:
        raise SystemExit(f"seed {seed}: {run_dir / 'metrics.jsonl'} has no eval or no timed step")
    final = evals[-1]
    per_type = {
        key.split("/", 1)[1]: {"accuracy": value, "novision_accuracy": final[f"novision_{key}"]}
        for key, value in final.items()
        if key.startswith("accuracy/")
    }
    result = {
        "seed": seed,
        "iterations": final["iteration"],
        "wall_s": round(wall_s, 1),
        # averaged over question types, as the demo's summary line and its target are
        "accuracy": statistics.mean(t["accuracy"] for t in per_type.values()),
        "novision_accuracy": statistics.mean(t["novision_accuracy"] for t in per_type.values()),
        "per_type": per_type,
        "step_s": {
            "min": steps[0],
            "p10": steps[len(steps) // 10],
            "median": statistics.median(steps),
            "p90": steps[len(steps) * 9 // 10],
            "max": steps[-1],
            "logged_steps": len(steps),
        },
    }
    print(f"seed {seed}: accuracy {result['accuracy']:.3f}, no vision {result['novision_accuracy']:.3f}, "
          f"{wall_s:.0f} s", flush=True)  # fmt: skip
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="examples/configs/tiny.yaml")
    ap.add_argument("--seeds", type=int, nargs="+", default=[1234, 1, 2])
    ap.add_argument("--nproc-per-node", type=int, default=2)
    ap.add_argument("--output", required=True, help="results JSON to write")
    args = ap.parse_args()

    runs = [run_seed(args.config, seed, args.nproc_per_node) for seed in args.seeds]
    write_results(
        args.output,
        "demo_seeds.py",
        None,
        {"config": args.config, "nproc_per_node": args.nproc_per_node, "cpu": cpu_model(), "cpu_count": os.cpu_count()},
        chance={"accuracy": chance_accuracy(), "per_type": chance_by_type()},
        runs=runs,
    )
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
