"""Run the demo (``make demo``'s command) once per seed and CPU kernel set, and record what each run reached.

    python tools/demo_seeds.py --seeds 1234 1 2 --kernels default avx2 --output benchmarks/results/demo_seeds_cpu.json

Each run trains from scratch into ``runs/demo-seed-<seed>-<kernels>`` (removed first; the generated
data is shared). ``default`` runs the CPU kernels torch, MKL and oneDNN pick on this machine (its
capability is recorded, e.g. ``AVX512``); ``avx2`` makes all three use their AVX2 kernels, which is
what a CPU without AVX-512 computes (:data:`AVX2_ENV`). Floats differ between the two, so their runs
differ too. The results file holds, per run: the final held-out accuracy per question type, the
same model with the frames blanked (no vision), chance, the first iterations' training losses
(``tests/training/test_demo_losses.py`` reruns them), the console output, the wall time and the
spread of its step times; README's demo section is rendered from it (``tools/render_results.py``).
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
DEMO_COMMAND = ("-m", "lvx_megatron.torchrun")  # make demo's launcher
# torch's own kernels (ATEN), MKL's matrix products and oneDNN's convolutions each pick their
# instruction set from the CPU; these make all three take the AVX2 ones.
AVX2_ENV = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "DNNL_MAX_CPU_ISA": "AVX2"}
KERNEL_ENVS = {"default": {}, "avx2": AVX2_ENV}
FIRST_LOSSES = 100  # iterations whose logged training losses are recorded


def cpu_model() -> str:
    """The CPU's model name (Linux), so a wall time names the machine it was measured on."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def cpu_capability(env: dict[str, str]) -> str:
    """The kernel set torch's CPU code runs with under ``env`` (e.g. ``AVX512``, ``AVX2``)."""
    code = "import torch; print(torch.backends.cpu.get_cpu_capability())"
    proc = subprocess.run([sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True, text=True)
    return proc.stdout.strip() or "unknown"


def demo_command(config: str, nproc: int, *flags: str) -> list[str]:
    """``make demo``'s command with more flags."""
    return [
        sys.executable, *DEMO_COMMAND, f"--nproc-per-node={nproc}", "pretrain_mllm.py", "--config", config, *flags,
    ]  # fmt: skip


def train_losses(metrics: Path, until: int) -> dict[str, float]:
    """``{iteration: loss}`` of the logged training records up to ``until`` (string keys, as JSON has them)."""
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    return {str(r["iteration"]): r["loss"] for r in records if r["kind"] == "train" and r["iteration"] <= until}


def run_seed(config: str, seed: int, nproc: int, kernels: str) -> dict:
    """Train the demo with ``seed`` on the CPU kernels ``kernels`` into its own folder; what it reached."""
    run_dir = REPO / "runs" / f"demo-seed-{seed}-{kernels}"
    shutil.rmtree(run_dir, ignore_errors=True)
    cmd = demo_command(config, nproc, "--seed", str(seed), "--save", str(run_dir), "--load", str(run_dir))
    env = KERNEL_ENVS[kernels]
    print(f"seed {seed}, {kernels} kernels: {' '.join(cmd[1:])}", flush=True)
    start = time.perf_counter()
    console = []
    with subprocess.Popen(cmd, cwd=REPO, env={**os.environ, **env}, stdout=subprocess.PIPE, text=True) as proc:
        for line in proc.stdout:  # shown as it comes, and kept for the README's output block
            print(line, end="", flush=True)
            console.append(line.rstrip("\n"))
    wall_s = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(f"seed {seed}, {kernels}: the demo failed with exit status {proc.returncode}")
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
        "kernels": kernels,
        "capability": cpu_capability(env),
        "env": env,
        "iterations": final["iteration"],
        "wall_s": round(wall_s, 1),
        # averaged over question types, as the demo's summary line and its target are
        "accuracy": statistics.mean(t["accuracy"] for t in per_type.values()),
        "novision_accuracy": statistics.mean(t["novision_accuracy"] for t in per_type.values()),
        "per_type": per_type,
        "train_losses": train_losses(run_dir / "metrics.jsonl", FIRST_LOSSES),
        "step_s": {
            "min": steps[0],
            "p10": steps[len(steps) // 10],
            "median": statistics.median(steps),
            "p90": steps[len(steps) * 9 // 10],
            "max": steps[-1],
            "logged_steps": len(steps),
        },
        "console": console,
    }
    print(f"seed {seed}, {kernels}: accuracy {result['accuracy']:.3f}, no vision {result['novision_accuracy']:.3f}, "
          f"{wall_s:.0f} s", flush=True)  # fmt: skip
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="examples/configs/tiny.yaml")
    ap.add_argument("--seeds", type=int, nargs="+", default=[1234, 1, 2])
    ap.add_argument("--kernels", nargs="+", choices=sorted(KERNEL_ENVS), default=["default", "avx2"])
    ap.add_argument("--nproc-per-node", type=int, default=2)
    ap.add_argument("--output", required=True, help="results JSON to write")
    args = ap.parse_args()

    runs = [run_seed(args.config, seed, args.nproc_per_node, k) for k in args.kernels for seed in args.seeds]
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
