"""Faults a long run meets: preemption signals (also during a save), SIGKILL, NaN and diverged weights, broken
samples, hangs, a second run on the same folder."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from train_harness import (
    TINY,
    bad_sample_counts,
    inf_weight_run,
    nan_run,
    run_trainers,
    run_trainers_or_errors,
    signal_run,
    small_run,
    train_losses,
)

from lvx_megatron.data.shards import ShardedVideoDataset, write_shards
from lvx_megatron.data.tokenizer import build_tokenizer
from lvx_megatron.data.video_qa import VideoQAGenerator
from lvx_megatron.launch import spawn_gloo
from lvx_megatron.training.config import load_config
from lvx_megatron.training.data import BatchSource, DataError

REPO = TINY.parents[2]


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_non_finite_step_is_skipped_and_training_goes_on(tmp_path):
    run = small_run(str(tmp_path / "data"), str(tmp_path / "run"), **{"training.train_iters": 5})
    final = spawn_gloo(1, nan_run, run, 2)[0]
    records = [r for r in _records(tmp_path / "run") if r["kind"] == "train"]
    assert [r["skipped"] for r in records] == [False, False, True, False, False]
    assert records[2]["loss"] == "nan" and records[2]["skipped_steps"] == 1
    assert all(np.isfinite(r["loss"]) for i, r in enumerate(records) if i != 2)
    assert final["iteration"] == 5 and np.isfinite(final["eval"]["loss"])


def test_too_many_non_finite_steps_stop_with_the_last_checkpoint_intact(tmp_path):
    run = small_run(
        str(tmp_path / "data"),
        str(tmp_path / "run"),
        **{"training.max_skipped_steps": 0, "checkpoint.save": str(tmp_path / "ckpt"), "checkpoint.save_interval": 2},
    )
    # One non-finite step may be a bad batch (it is here): the checkpoint before it stays.
    with pytest.raises(Exception, match=r"more than training\.max_skipped_steps = 0\), the last 1 in a row at "):
        spawn_gloo(1, nan_run, run, 2)
    assert (tmp_path / "ckpt" / "latest_checkpointed_iteration.txt").read_text() == "2"


def test_a_diverged_run_stops_in_one_line_with_its_last_healthy_checkpoint_newest(tmp_path, capsys):
    """The issue's reproduction, ``--lr 1e10 --save-interval 1``: the step of iteration 2 (the first after the
    warm-up) explodes the weights, every later step is non-finite. Before, iteration 2 was saved and kept
    as the intact newest checkpoint (the stop was an 85-line traceback) and exported with exit 0."""
    ckpt = tmp_path / "ckpt"
    config = _write_config(tmp_path, training={"max_skipped_steps": 2}, checkpoint={"save": str(ckpt), "load": None})
    out, _ = _train(config, "--lr", "1e10", "--save-interval", "1").communicate(timeout=600)
    errors = [line for line in out.splitlines() if line.startswith("training error: ")]
    assert len(errors) == 1 and "Traceback" not in out, out[-3000:]
    assert errors[0] == (
        "training error: 3 iterations with non-finite loss or gradients (more than training.max_skipped_steps = "
        "2), the last 3 in a row at iteration 5; set aside iter_0000002 (saved from these weights) as *.diverged; "
        f"the newest healthy checkpoint is {ckpt / 'iter_0000001'} (tracked)"
    )
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text() == "1"
    assert sorted(p.name for p in ckpt.glob("iter_*")) == ["iter_0000001", "iter_0000002.diverged"]
    from tools.convert_hf_checkpoint import main

    argv = ["export", "--load", str(ckpt), "--out", str(tmp_path / "hf"), "--vocab-size", "29"]
    assert main(argv) == 0
    assert f"checkpoint: using {ckpt / 'iter_0000001'} (iteration 1): the tracker's" in capsys.readouterr().out


def test_non_finite_weights_are_never_saved(tmp_path):
    ckpt = tmp_path / "ckpt"
    run = small_run(
        str(tmp_path / "data"), str(tmp_path / "run"), **{"checkpoint.save": str(ckpt), "checkpoint.save_interval": 1}
    )
    with pytest.raises(Exception, match=r"iteration 2: the weights are not finite; not saved; the newest checkpoint "):
        spawn_gloo(1, inf_weight_run, run, 2)
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text() == "1"
    assert sorted(p.name for p in ckpt.glob("iter_*")) == ["iter_0000001"]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1])
def test_a_signal_on_one_rank_stops_every_rank_with_a_checkpoint(tmp_path, signum):
    run = small_run(
        str(tmp_path / "data"),
        str(tmp_path / "run"),
        **{"parallel.context_parallel_size": 2, "checkpoint.save": str(tmp_path / "ckpt"), "training.train_iters": 8},
    )
    finals = spawn_gloo(2, signal_run, run, 1, int(signum), 2)
    assert [f["stopped"] for f in finals] == [True, True]
    assert [f["iteration"] for f in finals] == [3, 3]  # the step in flight finishes, then all save
    assert (tmp_path / "ckpt" / "latest_checkpointed_iteration.txt").read_text() == "3"


# A torchrun worker whose first checkpoint save waits, in its write step, until this worker got SIGTERM (a
# ready file per rank says it is waiting); megatron's writer has its helper state (the results queue) by then.
SAVE_WAITS_FOR_SIGTERM = """
import os, signal, sys, time
from pathlib import Path
import lvx_megatron.training.checkpointing as checkpointing
from megatron.core.dist_checkpointing.strategies import filesystem_async

write = checkpointing.dist_checkpointing.save
waited = []

def save(*args, **kwargs):
    if not waited:
        got, stop = [], signal.getsignal(signal.SIGTERM)
        signal.signal(signal.SIGTERM, lambda *a: (got.append(True), stop(*a)))
        filesystem_async.get_write_results_queue()
        Path(sys.argv[1], "ready" + os.environ["RANK"]).touch()
        while not got:
            time.sleep(0.01)
        signal.signal(signal.SIGTERM, stop)
        waited.append(True)
    return write(*args, **kwargs)

if __name__ == "__main__":
    checkpointing.dist_checkpointing.save = save
    from lvx_megatron.training import main
    main(sys.argv[2:])
"""


def test_sigterm_to_the_launcher_during_a_save_lets_it_finish_then_stops(tmp_path):
    """Before, rank 0 died with no output (the SIGTERM that torchrun sends to each worker's process group
    killed megatron's writer helper process) and the save in flight was lost."""
    ckpt, ready = tmp_path / "ckpt", tmp_path / "ready"
    ready.mkdir()
    script = tmp_path / "train.py"
    script.write_text(SAVE_WAITS_FOR_SIGTERM)
    config = _write_config(
        tmp_path,
        checkpoint={"save": str(ckpt), "load": None, "save_interval": 2},
        parallel={"context_parallel_size": 2},
    )
    launcher = [sys.executable, "-m", "lvx_megatron.torchrun", "--nproc-per-node=2", str(script), str(ready)]
    proc = subprocess.Popen(
        [*launcher, "--config", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"},
    )
    deadline = time.time() + 300
    while not all((ready / f"ready{rank}").exists() for rank in (0, 1)):
        assert time.time() < deadline and proc.poll() is None, "the run ended before its first save"
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)  # to the launcher, as Slurm or a user does
    out, _ = proc.communicate(timeout=300)
    assert "SIGTERM: saving a checkpoint and stopping at iteration 2" in out, out[-3000:]
    assert "Connection closed by peer" not in out and "forcefully exiting" not in out, out[-3000:]
    assert "Traceback" not in out and out.strip().splitlines()[-1].startswith("launcher: SIGTERM: passed on"), out[
        -3000:
    ]
    assert proc.returncode == 128 + signal.SIGTERM
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text() == "2"
    assert sorted(p.name for p in ckpt.iterdir() if p.name.startswith("iter_")) == ["iter_0000002"]
    assert (ckpt / "iter_0000002" / "manifest.json").is_file()


def _holder(tmp_path: Path, which: str) -> dict:
    """A lock's holder: a live process of this host (the test's), a process of another host, or a process of
    this host that has ended."""
    if which == "live":
        return {"host": socket.gethostname(), "pid": os.getpid()}
    if which == "other-host":
        return {"host": "node-7.example", "pid": 4242}
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return {"host": socket.gethostname(), "pid": int(ended.stdout)}


@pytest.mark.parametrize("which", ["live", "other-host", "ended"])
def test_one_run_per_save_folder(tmp_path, capfd, which):
    """Before, a second run on the same folder ran along, died at its first save with a message about the
    other run's checkpoint and mixed its metrics into the other's metrics.jsonl."""
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    holder = _holder(tmp_path, which)
    (ckpt / "run.lock").write_text(json.dumps(holder))
    run = small_run(str(tmp_path / "data"), str(tmp_path / "run"), **{"checkpoint.save": str(ckpt)})
    described = f"pid {holder['pid']} on host {holder['host']}"
    if which == "ended":  # taken over, said, and given up when the run ends
        spawn_gloo(1, run_trainers, [run])
        assert f"checkpoint.save: took over the stale {ckpt / 'run.lock'} of {described} (that process has ended)" in (
            capfd.readouterr().out
        )
        assert not (ckpt / "run.lock").exists() and (ckpt / "latest_checkpointed_iteration.txt").read_text() == "4"
        return
    with pytest.raises(Exception) as err:
        spawn_gloo(1, run_trainers, [run])
    expected = f"config error: checkpoint.save: {ckpt} is in use by another run ({described}); one run per folder"
    assert expected in str(err.value), str(err.value)
    assert not (tmp_path / "data").exists()  # refused at the start, before any data is generated
    assert json.loads((ckpt / "run.lock").read_text()) == holder


def _write_config(tmp_path: Path, **sections) -> Path:
    tree = yaml.safe_load(TINY.read_text())
    tree["data"].update(path=str(tmp_path / "data"), train_samples=64, eval_samples=16)
    tree["training"].update(
        micro_batch_size=4, global_batch_size=8, train_iters=8, lr_warmup_iters=1, log_interval=1, eval_iters=1
    )
    tree["parallel"]["context_parallel_size"] = 1
    tree["logging"]["wandb_mode"] = "disabled"
    for section, values in sections.items():
        tree[section].update(values)
    path = tmp_path / f"run{len(list(tmp_path.glob('run*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def _train(config: Path, *flags: str, **popen):
    """pretrain_mllm.py in a process group of its own (see the SIGKILL below)."""
    return subprocess.Popen(
        [sys.executable, str(REPO / "pretrain_mllm.py"), "--config", str(config), *flags],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        **popen,
    )


def test_sigkill_then_restart_continues_the_uninterrupted_loss_curve(tmp_path):
    reference = _write_config(tmp_path, checkpoint={"save": str(tmp_path / "ref"), "load": None})
    out, _ = _train(reference).communicate(timeout=600)
    expected = train_losses(tmp_path / "ref")
    assert len(expected) == 8, out

    ckpt = str(tmp_path / "crash")
    crashing = _write_config(tmp_path, checkpoint={"save": ckpt, "load": ckpt, "save_interval": 2})
    proc = _train(crashing)
    deadline = time.time() + 300
    while not (Path(ckpt) / "metrics.jsonl").exists() or len(train_losses(ckpt)) < 5:
        assert time.time() < deadline and proc.poll() is None, "the run ended before it could be killed"
        time.sleep(0.05)
    # The whole process group, as a node death or torchrun's agent kills it: killing only the trainer
    # would orphan its helper processes (megatron-core's checkpoint writers' multiprocessing manager).
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    resumed_from = int((Path(ckpt) / "latest_checkpointed_iteration.txt").read_text())
    assert resumed_from in (2, 4, 6)
    out, _ = _train(crashing).communicate(timeout=600)
    assert f"resumed at iteration {resumed_from}" in out
    records = [r for r in _records(Path(ckpt)) if r["kind"] == "train"]
    after = [r["loss"] for r in records if r["iteration"] > resumed_from][-(8 - resumed_from) :]
    np.testing.assert_allclose(after, expected[resumed_from:], rtol=1e-6)


def _broken_shards(tmp_path: Path) -> Path:
    """8 samples: #1 has a corrupted PNG, #3 an empty question, #5 too many frames (8 > data.max_images = 4)."""
    gen = VideoQAGenerator(8, 4, 32, seed=3)
    samples = [dict(gen[i]) for i in range(8)]
    samples[3]["question"] = "  "
    samples[5]["frames"] = np.concatenate([samples[5]["frames"], samples[5]["frames"][:4]])
    write_shards(samples, str(tmp_path / "shards"), samples_per_shard=8, log_every=100)
    ds = ShardedVideoDataset(str(tmp_path / "shards"))
    shard, _, members = ds._entries[1]
    offset, size = members["000.png"]
    with open(tmp_path / "shards" / ds.shard_names[shard], "r+b") as f:
        f.seek(offset + size // 2)
        f.write(b"\x00" * 16)
    return tmp_path / "shards"


def test_broken_samples_are_skipped_counted_and_bounded(tmp_path):
    shards = _broken_shards(tmp_path)
    overrides = {"data.path": str(shards), "training.micro_batch_size": 8, "training.global_batch_size": 8}
    cfg = load_config(TINY, overrides)
    tokenizer = build_tokenizer("words")
    source = BatchSource(cfg, ShardedVideoDataset(str(shards)), tokenizer, 0, 1, seed=0)
    (batch,) = source.micro_batches(0, device="cpu", prefetch_next=False)
    assert source.bad_samples == 3 and batch["tokens"].shape == (8, 24)
    source.close()

    strict = load_config(TINY, {**overrides, "data.max_bad_samples": 2})
    source = BatchSource(strict, ShardedVideoDataset(str(shards)), tokenizer, 0, 1, seed=0)
    with pytest.raises(DataError, match=r"3 unreadable or invalid samples \(more than data.max_bad_samples = 2\)"):
        source.micro_batches(0, device="cpu", prefetch_next=False)
    source.close()


def test_a_bad_sample_is_counted_once_however_often_it_is_read(tmp_path, capsys):
    """Three epochs over the 8 samples: 3 bad samples, each named once (they were counted at every read
    attempt: 3 more each epoch, more where one bad sample follows another)."""
    shards = _broken_shards(tmp_path)
    overrides = {"data.path": str(shards), "training.micro_batch_size": 4, "training.global_batch_size": 4}
    source = BatchSource(load_config(TINY, overrides), ShardedVideoDataset(str(shards)), build_tokenizer("words"),
                         0, 1, seed=0, verbose=True)  # fmt: skip
    counts = []
    for iteration in range(6):
        source.micro_batches(iteration, device="cpu")
        counts.append(source.bad_samples)
    source.close()
    assert counts[1:] == [3] * 5, counts
    named = [line.split()[3] for line in capsys.readouterr().out.splitlines() if line.startswith("skipping")]
    assert sorted(named) == ["1:", "3:", "5:"], named


def test_bad_samples_are_counted_over_all_data_parallel_ranks(tmp_path):
    """DP 2, each rank reading its own half: both ranks count the bad samples of both halves, each once."""
    shards = _broken_shards(tmp_path)
    counts = spawn_gloo(2, bad_sample_counts, str(shards), 3)
    assert counts[0] == counts[1] and counts[0][-1] == 3, counts


def test_the_bad_sample_limit_saves_a_checkpoint_and_a_resume_counts_on(tmp_path):
    """Past data.max_bad_samples the run saves its iterations, then stops with one line naming the limit and
    the checkpoint; resumed with a higher limit, it counts on from the checkpoint's count (not from 0) and
    each bad sample once: 3 after two epochs."""
    root = tmp_path / "data"
    (root / "train").parent.mkdir()
    _broken_shards(tmp_path).rename(root / "train")
    gen = VideoQAGenerator(4, 4, 32, seed=4)
    write_shards([gen[i] for i in range(4)], str(root / "eval"), log_every=0)
    ckpt = str(tmp_path / "ckpt")
    run = small_run(str(root), str(tmp_path / "run"), **{
        "data.kind": "shards", "data.max_images": 4, "training.global_batch_size": 4, "training.train_iters": 4,
        "checkpoint.save": ckpt, "checkpoint.load": ckpt,
    })  # fmt: skip
    first = load_config(TINY, run)  # how many bad samples the first iteration meets: the limit
    probe = BatchSource(first, ShardedVideoDataset(str(root / "train")), build_tokenizer("words"), 0, 1, seed=0)
    probe.micro_batches(0, device="cpu", prefetch_next=False)
    probe.close()
    limit = probe.bad_samples
    assert 0 < limit < 3

    stopped, resumed = spawn_gloo(1, run_trainers_or_errors, [{**run, "data.max_bad_samples": limit}, run])[0]
    assert isinstance(stopped, str) and "\n" not in stopped, stopped
    assert stopped.startswith(f"{limit + 1} unreadable or invalid samples (more than data.max_bad_samples = {limit})")
    saved = re.search(rf"; iteration (\d+) is saved under {ckpt}: fix the data or raise data.max_bad_samples, and "
                      "resume from it$", stopped)  # fmt: skip
    at = int(saved[1])
    assert at >= 1 and (tmp_path / "ckpt" / f"iter_{at:07d}").is_dir(), stopped
    assert resumed["iteration"] == 4
    counts = {r["iteration"]: r["bad_samples"] for r in _records(tmp_path / "ckpt") if r["kind"] == "train"}
    assert sorted(counts) == [1, 2, 3, 4] and counts[4] == 3, counts
    assert all(counts[i] >= limit + 1 for i in range(at + 1, 5)), counts  # counted on after the resume


HANG_SCRIPT = """
import multiprocessing, sys, time, torch, torch.distributed as dist
from lvx_megatron.launch import spawn_gloo
from lvx_megatron.training.watchdog import HangWatchdog

def worker(rank, world_size):
    if rank == 1:
        time.sleep(60)  # never joins the all-reduce
    # A helper process, as megatron-core's checkpoint writers start one: the abort must end it too.
    manager = multiprocessing.get_context("spawn").Manager()
    watchdog = HangWatchdog(timeout_s=2.0, rank=rank, poll_s=0.2)
    watchdog.iteration = 7
    with watchdog.phase("forward-backward"):
        dist.all_reduce(torch.ones(1))

if __name__ == "__main__":
    spawn_gloo(2, worker)
"""


def test_a_hung_collective_aborts_naming_the_rank_and_the_phase(tmp_path):
    script = tmp_path / "hang.py"
    script.write_text(HANG_SCRIPT)
    start = time.time()
    proc = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert proc.returncode != 0 and time.time() - start < 60
    assert "hang: rank 0: 'forward-backward' at iteration 7 made no progress for" in proc.stderr
    assert "all_reduce" in proc.stderr  # the stack names the waiting collective


def test_corrupted_checkpoint_falls_back_to_the_previous_and_old_ones_rotate(tmp_path):
    ckpt = tmp_path / "ckpt"
    run = small_run(
        str(tmp_path / "data"),
        str(tmp_path / "run"),
        **{"checkpoint.save": str(ckpt), "checkpoint.save_interval": 1, "checkpoint.keep_last": 2},
    )
    spawn_gloo(1, run_trainers, [run])
    assert sorted(p.name for p in ckpt.glob("iter_*")) == ["iter_0000003", "iter_0000004"]  # keep_last 2
    shard = next((ckpt / "iter_0000004").glob("*.distcp"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped bit in the newest checkpoint
    shard.write_bytes(bytes(data))

    longer = {
        "checkpoint.load": str(ckpt),
        "training.train_iters": 5,
        "checkpoint.use_checkpoint_opt_param_scheduler": True,
    }
    resumed = small_run(str(tmp_path / "data"), str(tmp_path / "resumed"), **longer)
    spawn_gloo(1, run_trainers, [resumed])
    records = [r for r in _records(tmp_path / "resumed") if r["kind"] == "train"]
    assert [r["iteration"] for r in records] == [4, 5]  # resumed from iteration 3, the intact one
    assert records[0]["loss"] == pytest.approx(train_losses(ckpt)[3], rel=1e-6)


def test_truncated_checkpoint_with_no_intact_fallback_is_a_clear_error(tmp_path):
    ckpt = tmp_path / "ckpt"
    run = small_run(str(tmp_path / "data"), str(tmp_path / "run"), **{"checkpoint.save": str(ckpt)})
    spawn_gloo(1, run_trainers, [run])
    shard = next((ckpt / "iter_0000004").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:100])
    resumed = small_run(str(tmp_path / "data"), str(tmp_path / "r"), **{"checkpoint.load": str(ckpt)})
    with pytest.raises(Exception, match=r"no intact checkpoint under .*iter_0000004: __0_0\.distcp has 100 bytes"):
        spawn_gloo(1, run_trainers, [resumed])
