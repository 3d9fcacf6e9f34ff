"""The main job, shortened: the tiny config on 2 gloo ranks (CP 2) learns to use the frames.

A shorter version of ``make demo`` (fewer iterations and clips) through the real command line: its
held-out accuracy ends clearly above the same model's with every frame blanked and above chance,
and the run ends with its picture and one summary line.
"""

import json
import subprocess
import sys
from pathlib import Path

import yaml
from train_harness import TINY

REPO = Path(__file__).resolve().parents[2]


def test_a_short_demo_learns_from_the_frames_and_ends_with_its_picture(tmp_path):
    cfg = yaml.safe_load(TINY.read_text())
    cfg["data"].update(path=str(tmp_path / "data"), train_samples=4096, eval_samples=128)
    cfg["training"].update(train_iters=600, eval_interval=0, eval_iters=4, log_interval=50)
    cfg["checkpoint"] = {"save": str(tmp_path / "run"), "load": None, "save_interval": 0}
    cfg["logging"]["wandb_mode"] = "disabled"
    config = tmp_path / "demo.yaml"
    config.write_text(yaml.safe_dump(cfg))
    proc = subprocess.run(
        [sys.executable, "-m", "lvx_megatron.torchrun", "--nproc-per-node=2", "pretrain_mllm.py", "--config", config],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    final = [r for r in records if r["kind"] == "eval"][-1]
    chance = next(r for r in records if r["kind"] == "data")["chance"]
    assert final["accuracy"] >= final["novision_accuracy"] + 0.1, final
    assert final["accuracy"] >= chance + 0.1, (final, chance)
    assert {k for k in final if k.startswith("accuracy/")} == {"accuracy/count", "accuracy/most", "accuracy/seen"}
    assert (tmp_path / "run" / "metrics.png").is_file()
    summary = proc.stdout.strip().splitlines()[-1]
    assert summary.startswith("done in ") and "averaged over question types" in summary and "metrics.png" in summary
    assert "600/600" in proc.stdout
    assert "common state dict differs" not in proc.stderr  # the CP ranks' saves agree (checkpointing.py)
