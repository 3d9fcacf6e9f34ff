"""Runs of ``pretrain_mllm.py``'s trainer on the tiny config inside gloo worker processes."""

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import yaml

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


def run_pretrain(tmp_path: Path, config: Path, data: dict) -> subprocess.CompletedProcess:
    """``pretrain_mllm.py`` in one process (CP 1) on ``config`` with these ``data`` fields, its run in
    ``tmp_path/run``, no checkpoints or W&B."""
    tree = yaml.safe_load(config.read_text())
    tree["data"].update(data)
    tree["parallel"]["context_parallel_size"] = 1
    tree["checkpoint"], tree["logging"] = {}, {"wandb_mode": "disabled", "run_dir": str(tmp_path / "run")}
    path = tmp_path / f"{config.stem}-run.yaml"
    path.write_text(yaml.safe_dump(tree))
    return subprocess.run(
        [sys.executable, str(TINY.parents[2] / "pretrain_mllm.py"), "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


def train_losses(run_dir: str) -> list[float]:
    """Per-iteration training losses from a run's metrics.jsonl."""
    path = Path(run_dir) / "metrics.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines()]
    return [r["loss"] for r in records if r["kind"] == "train"]


def run_trainers(rank: int, world_size: int, runs: list[dict]) -> list[dict]:
    """Worker: train each run's overrides of the tiny config in turn; returns each run's final metrics."""
    return run_configs(rank, world_size, [(TINY, overrides) for overrides in runs])


def run_configs(rank: int, world_size: int, runs: list[tuple[Path, dict]]) -> list[dict]:
    """Worker: train each ``(config file, overrides)`` in turn; returns each run's final metrics."""
    from lvx_megatron.training.config import load_config
    from lvx_megatron.training.loop import Trainer

    results = []
    for config, overrides in runs:
        trainer = Trainer(load_config(config, overrides))
        try:
            results.append(trainer.run())
        finally:
            trainer.close()
    return results


def nan_run(rank: int, world_size: int, overrides: dict, bad_iteration: int) -> dict:
    """Worker: train with NaN pixels in the batches of 0-based ``bad_iteration``."""
    from lvx_megatron.training.config import load_config
    from lvx_megatron.training.loop import Trainer

    trainer = Trainer(load_config(TINY, overrides))
    original = trainer.train_source._load

    def poisoned(iteration):
        batches = original(iteration)
        if iteration == bad_iteration:
            for batch in batches:
                batch["pixel_values"].fill_(float("nan"))
        return batches

    trainer.train_source._load = poisoned
    try:
        return trainer.run()
    finally:
        trainer.close()


def signal_run(rank: int, world_size: int, overrides: dict, signal_rank: int, signum: int, at_iteration: int) -> dict:
    """Worker: rank ``signal_rank`` receives ``signum`` during 0-based iteration ``at_iteration``."""
    import os

    from lvx_megatron.training.config import load_config
    from lvx_megatron.training.loop import Trainer

    trainer = Trainer(load_config(TINY, overrides))
    original = trainer.train_step

    def step():
        if rank == signal_rank and trainer.iteration == at_iteration:
            os.kill(os.getpid(), signum)
        return original()

    trainer.train_step = step
    try:
        return trainer.run()
    finally:
        trainer.close()


def inf_weight_run(rank: int, world_size: int, overrides: dict, iteration: int) -> dict:
    """Worker: iteration ``iteration``'s optimizer step leaves one weight at inf."""
    import torch

    from lvx_megatron.training.config import load_config
    from lvx_megatron.training.loop import Trainer

    trainer = Trainer(load_config(TINY, overrides))
    original = trainer.train_step

    def step():
        metrics = original()
        if trainer.iteration + 1 == iteration:  # the loop counts the iteration after its step
            with torch.no_grad():
                next(trainer.state.stage.parameters()).view(-1)[0] = float("inf")
        return metrics

    trainer.train_step = step
    try:
        return trainer.run()
    finally:
        trainer.close()


def run_trainers_or_errors(rank: int, world_size: int, runs: list[dict]) -> list[dict | str]:
    """Worker: :func:`run_trainers`, where a run that stops with a data error gives its message instead."""
    from lvx_megatron.training.config import load_config
    from lvx_megatron.training.data import DataError
    from lvx_megatron.training.loop import Trainer

    results = []
    for overrides in runs:
        trainer = Trainer(load_config(TINY, overrides))
        try:
            results.append(trainer.run())
        except DataError as exc:
            results.append(str(exc))
        finally:
            trainer.close()
    return results


def bad_sample_counts(rank: int, world_size: int, shards: str, iterations: int) -> list[int]:
    """Worker: this data-parallel rank's ``bad_samples`` after each of ``iterations`` reads of ``shards``
    (micro-batches of 2, global batches of 8)."""
    from lvx_megatron.data.shards import ShardedVideoDataset
    from lvx_megatron.data.tokenizer import build_tokenizer
    from lvx_megatron.training.config import load_config
    from lvx_megatron.training.data import BatchSource

    cfg = load_config(TINY, {"data.path": shards, "training.micro_batch_size": 2, "training.global_batch_size": 8})
    source = BatchSource(cfg, ShardedVideoDataset(shards), build_tokenizer("words"), rank, world_size, seed=0)
    counts = []
    try:
        for iteration in range(iterations):
            source.micro_batches(iteration, "cpu")
            counts.append(source.bad_samples)
    finally:
        source.close()
    return counts
