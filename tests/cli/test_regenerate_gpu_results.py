"""tools/regenerate_gpu_results.py on CPU: the plan, stage selection and budget, the tests stage's
results file, stopping a stage that runs too long, and the fused training config it runs."""

import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lvx_megatron.training.config import load_config
from tools import regenerate_gpu_results as regen

REPO = Path(__file__).resolve().parents[2]


def test_fused_config_is_the_1b_config_with_the_fused_backend():
    base = load_config(REPO / "examples/configs/single-gpu-1b.yaml").model_dump()
    fused = load_config(REPO / "examples/configs/single-gpu-1b-fused.yaml").model_dump()
    assert fused["model"]["cross_attention"]["backend"] == "fused"
    assert base["model"]["cross_attention"]["backend"] == "auto"
    for cfg in (base, fused):  # what may differ: the backend, where the run writes and its W&B name
        del cfg["model"]["cross_attention"]["backend"], cfg["logging"]["run_dir"], cfg["logging"]["wandb_exp_name"]
    assert fused == base


def test_dry_run_plans_the_selected_stages_in_order_with_files_named_by_device(capsys, tmp_path):
    out = tmp_path / "out"
    argv = [str(out), "--dry-run", "--device-name", "NVIDIA H200", "--only", "train-fused,sweep,check,bench"]
    assert regen.main([*argv, "--bench-flags", "--iters 5 --sq 64"]) == 0
    lines = capsys.readouterr().out.splitlines()
    commands = [line.split("$ ", 1)[1] for line in lines if "] $ " in line]
    assert [c.split()[1] for c in commands[:3]] == ["tools/gpu_check.py", *["tools/bench_block_attention.py"] * 2]
    assert commands[0].endswith(f"--output {out / 'gpu_check_h200.json'}")
    assert commands[1].endswith(f"--iters 5 --sq 64 --output {out / 'block_attention_h200.json'}")
    sweep = shlex.split(commands[2])
    assert sweep[2:5] == ["--sweep", "--shapes", regen.SWEEP_SHAPES]  # not the bench's flags
    assert sweep[-2:] == ["--output", str(out / "triton_tile_sweep_h200.json")]
    train, summary = shlex.split(commands[3]), shlex.split(commands[4])
    assert train[1:4] == ["-m", "torch.distributed.run", "--standalone"]
    assert train[train.index("--config") + 1] == "examples/configs/single-gpu-1b-fused.yaml"
    assert summary[1] == "tools/train_summary.py" and summary[2] == str(REPO / "runs/single-gpu-1b-fused/metrics.jsonl")
    assert summary[summary.index("--output") + 1] == str(out / "train_1b_h200_fused.json")
    assert shlex.split(summary[summary.index("--command") + 1])[1:] == train[1:]
    assert not out.exists()  # a dry run writes nothing


def test_unknown_stages_are_an_error():
    with pytest.raises(SystemExit) as exc:
        regen.main(["out", "--only", "tests,bogus"])
    assert exc.value.code == 2


def test_a_stage_is_not_started_without_its_minimum_time(capsys, tmp_path):
    rc = regen.main([str(tmp_path), "--dry-run", "--device-name", "cpu", "--only", "check,train", "--budget-s", "100"])
    out = capsys.readouterr().out
    assert rc == 1 and "check: planned" in out and re.search(r"train: not started: \d+ s left, it needs 180", out)


def test_tests_stage_records_each_outcome_and_the_counts(tmp_path):
    tests = tmp_path / "test_sample.py"
    tests.write_text(
        "import pytest\n\n"
        "def test_ok():\n    pass\n\n"
        "def test_bad():\n    assert False\n\n"
        "@pytest.mark.skip(reason='not here')\ndef test_skipped():\n    pass\n"
    )
    out, no_wheels = tmp_path / "out", tmp_path / "no_wheels"
    argv = [str(out), "--only", "tests", "--tests", str(tests), "--device-name", "cpu", "--wheels", str(no_wheels)]
    assert regen.main(argv) == 1  # a failing test fails the stage, and is recorded
    data = json.loads((out / "gpu_tests_cpu.json").read_text())
    assert data["counts"] == {"passed": 1, "failed": 1, "errors": 0, "skipped": 1, "total": 3}
    assert {t["test"].split("::")[1]: t["outcome"] for t in data["tests"]} == {
        "test_ok": "passed",
        "test_bad": "failed",
        "test_skipped": "skipped",
    }
    assert shlex.split(data["meta"]["command"]) == ["python", "tools/regenerate_gpu_results.py", *argv]
    assert shlex.split(data["meta"]["tests_command"])[-1] == str(tests)
    assert "tests: FAILED: exit status 1" in (out / "regenerate_cpu.log").read_text()


def test_a_stage_that_runs_too_long_is_stopped_with_the_processes_it_started(tmp_path):
    args = regen.parse_args([str(tmp_path), "--only", "check"])
    ctx = regen.Context(args, [], "cpu", dict(os.environ))
    ctx.stage, ctx.deadline = "check", time.monotonic() + 2
    # the child starts a grandchild; both must be gone afterwards (conftest fails a test that leaves one)
    code = "import subprocess, time; subprocess.Popen(['sleep', '300']); time.sleep(300)"
    began = time.monotonic()
    with pytest.raises(regen.StageError, match="timed out"):
        ctx.run([sys.executable, "-c", code])
    assert time.monotonic() - began < 60


def test_a_stopped_stage_is_interrupted_first_so_pytest_can_still_write_its_report(tmp_path):
    """stop_session (what a timed-out stage gets) sends SIGINT first: the child's KeyboardInterrupt
    handler runs. The signal goes only once the child says it is inside its ``try`` (a file), so a
    slow start under load cannot make it arrive too early."""
    ready, marker = tmp_path / "ready", tmp_path / "interrupted"
    # A shell's background job starts with SIGINT ignored, which Python then leaves alone: the child
    # takes KeyboardInterrupt's handler itself, as pytest under a terminal has it.
    code = (
        "import signal, time\nsignal.signal(signal.SIGINT, signal.default_int_handler)\n"
        f"try:\n    open({str(ready)!r}, 'w').close()\n    time.sleep(300)\n"
        f"except KeyboardInterrupt:\n    open({str(marker)!r}, 'w').close()"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], start_new_session=True)
    try:
        while not ready.exists() and proc.poll() is None:
            time.sleep(0.05)
        regen.stop_session(proc)
    finally:
        proc.kill()
        proc.wait()
    assert marker.is_file()


def test_a_copy_that_is_not_the_named_commit_runs_nothing(tmp_path, monkeypatch, capsys):
    """With $LVX_SOURCE_COMMIT naming a commit whose tree this checkout is not, no stage runs."""
    monkeypatch.setenv("LVX_SOURCE_COMMIT", "0" * 40)
    monkeypatch.setenv("LVX_SOURCE_TREE", "1" * 40)
    assert regen.main([str(tmp_path), "--device-name", "cpu", "--only", "check"]) == 2
    err = capsys.readouterr().err
    assert f"this copy is not $LVX_SOURCE_COMMIT {'0' * 40}" in err and "nothing run" in err
    assert not list(tmp_path.iterdir())


def test_the_generation_stage_benchmarks_32_and_128_frames(capsys, tmp_path):
    assert regen.main([str(tmp_path), "--dry-run", "--device-name", "NVIDIA H200", "--only", "generation"]) == 0
    command = next(line.split("$ ", 1)[1] for line in capsys.readouterr().out.splitlines() if "] $ " in line)
    words = shlex.split(command)
    assert words[1] == "tools/bench_generation.py" and words[words.index("--frames") + 1] == "32,128"
    assert words[-1] == str(tmp_path / "generation_1b_h200.json")
