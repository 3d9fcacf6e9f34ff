"""Run logging: metrics.jsonl records, W&B offline without credentials, W&B failures never stop a run."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image
from train_harness import TINY

from lvx_megatron.training import run_logger
from lvx_megatron.training.config import load_config
from lvx_megatron.training.plots import accuracy_keys, plot_run, read_metrics
from lvx_megatron.training.run_logger import RunLogger, format_duration

REPO = Path(__file__).resolve().parents[2]


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


def test_train_lines_show_the_iteration_out_of_the_total_and_an_eta(tmp_path, capsys, monkeypatch):
    cfg = _config(tmp_path, **{"logging.wandb_mode": "disabled"})
    logger = RunLogger(cfg, writer=True)
    clock = iter([100.0, 130.0, 160.0])  # begin; 30 s for the first 10 iterations; the eval line
    monkeypatch.setattr(run_logger.time, "monotonic", lambda: next(clock))
    logger.begin(0, 100)
    logger.log("train", 10, {"loss": 2.5})
    logger.log("eval", 10, {"accuracy": 0.5})
    logger.close()
    train, evaluation = capsys.readouterr().out.splitlines()[-2:]
    assert train.startswith("[train] iter  10/100 (ETA 4m30s) | loss 2.5")  # 90 iterations at 3 s
    assert evaluation.startswith("[eval] iter  10/100 | accuracy 0.5")
    assert [format_duration(s) for s in (42.4, 185, 3720)] == ["42s", "3m05s", "1h02m"]


def _metrics(run: Path, records: list[dict]) -> None:
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def test_the_run_picture_has_loss_accuracy_per_type_and_throughput(tmp_path):
    run = tmp_path / "run"
    records = [{"kind": "data", "iteration": 0, "chance": 0.3, "chance/a": 0.25, "chance/b": 0.5}]
    for it in range(10, 210, 10):
        records.append({"kind": "train", "iteration": it, "loss": 2.0 / it, "text_tokens_per_s": 1000.0 + it})
    for it in (100, 200):
        accuracies = {"accuracy": it / 250, "accuracy/a": it / 300, "accuracy/b": it / 220}
        novision = {f"novision_{k}": 0.3 for k in accuracies}
        records.append({"kind": "eval", "iteration": it, "loss": 1.0 / it, **accuracies, **novision})
    records.append({"kind": "train", "iteration": 200, "loss": 0.001, "text_tokens_per_s": 5.0})  # resumed: last wins
    _metrics(run, records)
    kept = read_metrics(run / "metrics.jsonl")
    assert len(kept) == len(records) - 1
    assert next(r for r in kept if r["iteration"] == 200 and r["kind"] == "train")["loss"] == 0.001
    assert accuracy_keys(kept[-1] if kept[-1]["kind"] == "eval" else kept[-2]) == [
        "accuracy",
        "accuracy/a",
        "accuracy/b",
    ]
    picture = plot_run(run)
    assert picture == run / "metrics.png"
    with Image.open(picture) as image:
        assert image.format == "PNG" and image.size[0] > 1000
    assert subprocess.run([sys.executable, "tools/plot_metrics.py", str(run), "--output", str(tmp_path / "p.png")],
                          cwd=REPO, capture_output=True, text=True).returncode == 0  # fmt: skip
    assert (tmp_path / "p.png").is_file()
    missing = subprocess.run(
        [sys.executable, "tools/plot_metrics.py", str(tmp_path / "nowhere")], cwd=REPO, capture_output=True, text=True
    )
    assert missing.returncode == 2 and "no metrics of a run there" in missing.stderr
