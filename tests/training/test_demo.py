"""The main job (``make demo``: the tiny config on 2 gloo ranks, CP 2), shortened and pinned.

- A shorter demo through the real command line learns to use the frames: its held-out accuracy ends
  far above the same model's with every frame blanked and above chance, on any CPU's kernels, and the
  run ends with its picture and one summary line.
- The demo's first iterations compute what ``benchmarks/results/demo_seeds_cpu.json`` recorded (the
  README's demo rows come from that file), within a tolerance that holds across CPU kernel sets
  (AVX-512, AVX2) yet far below what any change to the model, data or optimiser moves; and twice the
  same, bit for bit, with a CPU hog beside one of the runs: nothing in a run depends on timing.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from train_harness import TINY

from tools import demo_seeds

REPO = Path(__file__).resolve().parents[2]
SEEDS_FILE = REPO / "benchmarks" / "results" / "demo_seeds_cpu.json"
PINNED = (10, 20)  # iterations whose logged losses are compared (the demo logs every 10th)
# Relative: AVX2 and AVX-512 kernels give the demo's losses 1e-7 apart here (the file holds both),
# a changed initialisation, sample, learning rate or kernel moves them by 1e-3 and more.
LOSS_TOLERANCE = 1e-5
REGENERATE = (
    "if the change is intended, regenerate the demo's results: python tools/demo_seeds.py --seeds 1234 1 2 "
    "--kernels default avx2 --output benchmarks/results/demo_seeds_cpu.json, then python tools/render_results.py"
)


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory) -> Path:
    """Where the demo's generated dataset goes: made by the first run, reused by the others."""
    return tmp_path_factory.mktemp("demo") / "video_qa_tiny"


def _config(path: Path, data: Path, run: Path, **training) -> Path:
    """The tiny config with its data in ``data``, its run in ``run`` and ``training`` overrides."""
    cfg = yaml.safe_load(TINY.read_text())
    cfg["data"]["path"] = str(data)
    cfg["training"].update(training)
    cfg["checkpoint"] = {"save": str(run), "load": None, "save_interval": 0}
    cfg["logging"]["wandb_mode"] = "disabled"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _demo(config: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        demo_seeds.demo_command(str(config), 2),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=1200,
        env={**os.environ, **(env or {})},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


SHORT = {"train_iters": 500, "eval_interval": 0, "log_interval": 10}  # the short demo's overrides


@pytest.fixture(scope="module")
def short_demo(tmp_path_factory, demo_data):
    """The short demo on a kernel set, run once per module: ``(its output, its run folder)``."""
    runs: dict[str, tuple[subprocess.CompletedProcess, Path]] = {}

    def run(kernels: str) -> tuple[subprocess.CompletedProcess, Path]:
        if kernels not in runs:
            folder = tmp_path_factory.mktemp(f"short-{kernels}")
            config = _config(folder / "demo.yaml", demo_data, folder / "run", **SHORT)
            runs[kernels] = (_demo(config, demo_seeds.KERNEL_ENVS[kernels]), folder / "run")
        return runs[kernels]

    return run


def _recorded_run(kernels: str) -> dict:
    """The seeds file's seed-1234 run on ``kernels``; for the default kernels, the one of this machine's
    capability if the file has it."""
    runs = [r for r in json.loads(SEEDS_FILE.read_text())["runs"] if r["seed"] == 1234]
    if kernels == "default":
        capability = demo_seeds.cpu_capability({})
        return next(
            (r for r in runs if r["capability"] == capability), next(r for r in runs if r["kernels"] == kernels)
        )
    return next(r for r in runs if r["kernels"] == kernels)


def _assert_recorded(losses: dict[str, float], kernels: str) -> None:
    """``losses`` at ``PINNED`` are those the seeds file recorded on ``kernels``, within ``LOSS_TOLERANCE``."""
    recorded = _recorded_run(kernels)
    for iteration in map(str, PINNED):
        ours, theirs = losses[iteration], recorded["train_losses"][iteration]
        assert abs(ours - theirs) <= LOSS_TOLERANCE * abs(theirs), (
            f"iteration {iteration}: loss {ours!r}, {SEEDS_FILE.name} recorded {theirs!r} "
            f"({recorded['kernels']} kernels, {recorded['capability']}): the demo computes something else now; "
            + REGENERATE
        )


@pytest.mark.parametrize("kernels", ["default", "avx2"])
def test_a_short_demo_learns_from_the_frames_and_ends_with_its_picture(short_demo, kernels):
    proc, run = short_demo(kernels)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    final = [r for r in records if r["kind"] == "eval"][-1]
    chance = next(r for r in records if r["kind"] == "data")["chance"]
    # 512 held-out clips: the accuracy's standard error is about 0.02. With these settings, over seeds
    # 1234, 1, 2, 7 x both kernel sets, the gap to the frames-blanked model was 0.16-0.25 (with the old
    # lr 5e-3: -0.03 on AVX2 for seed 1234), and `most` (chance 0.2) reached 0.66 or more.
    assert final["accuracy"] >= final["novision_accuracy"] + 0.1, final
    assert final["accuracy"] >= chance + 0.1, (final, chance)
    assert final["accuracy/most"] >= final["novision_accuracy/most"] + 0.3, final
    assert {k for k in final if k.startswith("accuracy/")} == {"accuracy/count", "accuracy/most", "accuracy/seen"}
    assert (run / "metrics.png").is_file()
    summary = proc.stdout.strip().splitlines()[-1]
    assert summary.startswith("done in ") and "averaged over question types" in summary and "metrics.png" in summary
    assert "500/500" in proc.stdout
    assert "common state dict differs" not in proc.stderr  # the CP ranks' saves agree (checkpointing.py)
    # Its first iterations (the warm-up, whose learning rates do not depend on train_iters) are the
    # full demo's that the seeds file recorded on the same kernels.
    _assert_recorded(demo_seeds.train_losses(run / "metrics.jsonl", PINNED[-1]), kernels)


def test_the_demo_computes_the_same_whatever_the_load(tmp_path, short_demo, demo_data):
    """The short demo's first iterations again, with a CPU hog beside them: the same losses, bit for bit."""
    _, plain = short_demo("default")
    run = tmp_path / "loaded"
    config = _config(tmp_path / "loaded.yaml", demo_data, run, **SHORT, exit_interval=PINNED[-1])
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        _demo(config)
    finally:
        spinner.kill()
        spinner.wait()
    loaded = demo_seeds.train_losses(run / "metrics.jsonl", PINNED[-1])
    assert loaded == demo_seeds.train_losses(plain / "metrics.jsonl", PINNED[-1]), (
        "the same seed gave other losses with a CPU hog beside it: something depends on timing"
    )


def test_the_recorded_kernel_sets_agree_within_the_tolerance():
    """The file's evidence for LOSS_TOLERANCE: each seed's AVX2 and default-kernel runs begin alike."""
    runs = json.loads(SEEDS_FILE.read_text())["runs"]
    by_seed: dict[int, dict[str, dict]] = {}
    for run in runs:
        by_seed.setdefault(run["seed"], {})[run["kernels"]] = run
    assert {1234, 1, 2} <= set(by_seed) and all(set(k) == {"default", "avx2"} for k in by_seed.values()), REGENERATE
    for seed, kernels in by_seed.items():
        for iteration in map(str, PINNED):
            a, b = kernels["default"]["train_losses"][iteration], kernels["avx2"]["train_losses"][iteration]
            assert abs(a - b) <= LOSS_TOLERANCE * abs(a) / 10, (seed, iteration, a, b)
