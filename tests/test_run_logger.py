"""Run logging: metrics.jsonl records, W&B offline without credentials, W&B failures never stop a run."""

import json

import pytest
from train_harness import TINY

from lvx_megatron.training.config import load_config
from lvx_megatron.training.run_logger import RunLogger


def _config(tmp_path, **overrides):
    return load_config(TINY, {"checkpoint.save": str(tmp_path / "run"), "checkpoint.load": None, **overrides})


def test_offline_wandb_run_and_metrics_jsonl(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc credentials
    cfg = _config(tmp_path)
    logger = RunLogger(cfg, writer=True)
    logger.log("train", 1, {"loss": 2.5, "lr": 1e-3})
    logger.log("eval", 1, {"loss": 2.4, "accuracy": 0.5})
    logger.close()
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["kind"], r["iteration"], r["loss"]) for r in records] == [("train", 1, 2.5), ("eval", 1, 2.4)]
    runs = list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    run_id = (tmp_path / "run" / "wandb_run_id.txt").read_text()
    assert len(runs) == 1 and runs[0].name.endswith(run_id)

    resumed = RunLogger(cfg, writer=True)  # a resumed run continues the same W&B run and file
    resumed.log("train", 2, {"loss": 2.0})
    resumed.close()
    assert (tmp_path / "run" / "wandb_run_id.txt").read_text() == run_id
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 3


def test_wandb_failure_warns_and_training_logs_go_on(tmp_path, monkeypatch):
    import wandb

    def broken(*args, **kwargs):
        raise RuntimeError("no network")

    monkeypatch.setattr(wandb, "init", broken)
    with pytest.warns(UserWarning, match="W&B disabled for this run: no network"):
        logger = RunLogger(_config(tmp_path, **{"logging.wandb_mode": "online"}), writer=True)
    logger.log("train", 1, {"loss": float("nan")})  # non-finite values stay valid JSON
    logger.close()
    record = json.loads((tmp_path / "run" / "metrics.jsonl").read_text())
    assert record["loss"] == "nan"


def test_non_writer_ranks_write_nothing(tmp_path):
    RunLogger(_config(tmp_path), writer=False).log("train", 1, {"loss": 1.0})
    assert not (tmp_path / "run").exists()
