"""Runs of ``pretrain_mllm.py``'s trainer on the tiny config inside gloo worker processes."""

import json
import warnings
from pathlib import Path

warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex|absl).*")

TINY = Path(__file__).resolve().parents[1] / "examples" / "configs" / "tiny.yaml"


def small_run(data_dir: str, run_dir: str, **overrides) -> dict:
    """Overrides that shrink the tiny config to a few quick steps."""
    base = {
        "data.path": data_dir,
        "data.train_samples": 64,
        "data.eval_samples": 16,
        "training.micro_batch_size": 2,
        "training.global_batch_size": 8,
        "training.train_iters": 4,
        "training.lr_warmup_iters": 1,
        "training.log_interval": 1,
        "training.eval_iters": 1,
        "training.eval_interval": 0,
        "checkpoint.save": None,
        "checkpoint.load": None,
        "checkpoint.save_interval": 0,
        "logging.run_dir": run_dir,
        "logging.wandb_mode": "disabled",
        "parallel.context_parallel_size": 1,
    }
    base.update(overrides)
    return base


def train_losses(run_dir: str) -> list[float]:
    """Per-iteration training losses from a run's metrics.jsonl."""
    path = Path(run_dir) / "metrics.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines()]
    return [r["loss"] for r in records if r["kind"] == "train"]


def run_trainers(rank: int, world_size: int, runs: list[dict]) -> list[dict]:
    """Worker: train each run's overrides in turn; returns each run's final metrics."""
    from lvx_megatron.training.config import load_config
    from lvx_megatron.training.loop import Trainer

    results = []
    for overrides in runs:
        trainer = Trainer(load_config(TINY, overrides))
        try:
            results.append(trainer.run())
        finally:
            trainer.close()
    return results
