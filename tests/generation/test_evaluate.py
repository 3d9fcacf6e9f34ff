"""``tools/evaluate.py``: generated-answer accuracy per question type beside teacher forcing.

With greedy decoding a clip's generated answer is its reference exactly when every reference token
and the eos is the arg-max given the reference before it, which is the teacher-forced verdict: the
KV-cached generation and one full forward must agree clip by clip, and the teacher-forced accuracy
of the whole split must be the one the training loop logged for it.
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from evaluation_harness import EVAL_CLIPS, train_then_evaluate
from generation_harness import parse_error

from lvx_megatron.launch import spawn_gloo
from tools.evaluate import logged_accuracy, main, parse_args

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def scored(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("evaluate")
    run, output = root / "run", root / "scores.json"
    clips = spawn_gloo(2, train_then_evaluate, str(root / "data"), str(run), str(output))[0]
    return {"root": root, "run": run, "clips": clips, "rows": json.loads(output.read_text())["rows"]}


def _row(rows: list[dict], name: str) -> dict:
    return next(r for r in rows if r["question_type"] == name)


def test_generated_and_teacher_forced_agree_clip_by_clip(scored):
    clips = scored["clips"]
    assert clips["status"] == 0
    assert len(clips["generated"]) == EVAL_CLIPS
    assert clips["generated"] == clips["forced"]
    assert 0 < sum(clips["forced"]) < EVAL_CLIPS  # some answers right, some wrong: the comparison can fail


def test_the_tool_counts_each_type_and_matches_the_logged_accuracy(scored):
    clips, rows = scored["clips"], scored["rows"]
    everything = _row(rows, "all")
    assert everything["clips"] == EVAL_CLIPS
    assert everything["generated_exact_match"] == sum(clips["generated"]) / EVAL_CLIPS
    assert everything["teacher_forced"] == pytest.approx(everything["logged_teacher_forced"], abs=1e-12)
    for name in sorted({t for t in clips["types"] if t}):
        mine = [g for g, t in zip(clips["generated"], clips["types"], strict=True) if t == name]
        row = _row(rows, name)
        assert row["clips"] == len(mine)
        assert row["generated_exact_match"] == pytest.approx(sum(mine) / len(mine), abs=1e-12)
        assert row["teacher_forced"] == pytest.approx(row["logged_teacher_forced"], abs=1e-12)


def test_three_data_parallel_replicas_give_the_same_scores(scored):
    command = [sys.executable, "-m", "lvx_megatron.torchrun", "--nproc-per-node=3", "tools/evaluate.py"]
    output = scored["root"] / "dp3.json"
    args = [str(scored["run"]), "--context-parallel-size", "1", "--batch-size", "7", "--output", str(output)]
    done = subprocess.run([*command, *args], cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr
    assert "(TP 1, CP 1, 3 replicas), iteration 10 " in done.stdout and ": 64 clips" in done.stdout
    assert "| all | 64 |" in done.stdout
    rows = json.loads(output.read_text())["rows"]
    for mine, theirs in zip(rows, scored["rows"], strict=True):
        assert mine["question_type"] == theirs["question_type"] and mine["clips"] == theirs["clips"]
        assert mine["generated_exact_match"] == pytest.approx(theirs["generated_exact_match"], abs=1e-12)
        assert mine["teacher_forced"] == pytest.approx(theirs["teacher_forced"], abs=1e-12)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["runs/x", "--limit", "0"], "--limit must be a positive integer, got '0'"),
        (["runs/x", "--split", "test"], "argument --split: invalid choice: 'test'"),
        (["runs/x", "--batch-size", "x"], "--batch-size must be a positive integer"),
    ],
)
def test_bad_flags_name_the_flag(argv, message, capsys):
    assert message in parse_error(parse_args, argv, capsys)


def test_a_run_without_a_checkpoint_is_one_error_line(tmp_path, capsys):
    assert main([str(tmp_path)]) == 2
    assert "error: --load: no checkpoint in" in capsys.readouterr().err


def test_after_a_fallback_the_scores_are_compared_with_that_iteration_s_logged_accuracy(scored, capsys):
    """Before, the tool did not say which checkpoint it used, and compared iteration 5's scores with the
    accuracy logged at iteration 10."""
    run, output = scored["root"] / "damaged", scored["root"] / "fallback.json"
    shutil.copytree(scored["run"], run)
    shard = run / "iter_0000010" / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    assert main([str(run), "--batch-size", "32", "--output", str(output)]) == 0
    out = capsys.readouterr().out
    why = "fallback from iter_0000010 (not intact)"
    assert f"checkpoint: using {run / 'iter_0000005'} (iteration 5): {why}" in out, out
    assert f"iteration 5 ({why}): 64 clips" in out and "evaluation at the checkpoint's iteration 5, on its" in out
    written = json.loads(output.read_text())
    assert written["meta"]["iteration"] == 5 and written["meta"]["why"] == why
    everything = _row(written["rows"], "all")
    assert everything["logged_teacher_forced"] == logged_accuracy(run, 5)["accuracy"]
    assert everything["teacher_forced"] == pytest.approx(everything["logged_teacher_forced"], abs=1e-12)
    assert logged_accuracy(run, 7) is None  # no evaluation there: the table says "none logged there"
