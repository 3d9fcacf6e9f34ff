"""Data fault injection: damaged shard files, damaged or undecodable samples, interrupted generation.

Every fault ends in a one-line error naming the file, or in a skip or regeneration that says what it
skipped and why; never in a traceback, and never in a sample that differs from the one written.
"""

import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from train_harness import TINY, run_pretrain

from lvx_megatron.data import ShardedVideoDataset, ShardError, VideoQAGenerator, build_tokenizer, write_shards
from lvx_megatron.data.batch import collate
from lvx_megatron.data.ownership import MARKER
from lvx_megatron.data.sampler import micro_batches
from lvx_megatron.data.shards import encode_frame
from lvx_megatron.training import data as training_data
from lvx_megatron.training.config import ConfigError, load_config
from lvx_megatron.training.data import SETTINGS, BatchSource, ensure_synthetic

REPO = TINY.parents[2]
NUM_SAMPLES, PER_SHARD, BAD = 6, 3, 1  # two shards of three clips; sample BAD is the damaged one


def _samples() -> list[dict]:
    gen = VideoQAGenerator(NUM_SAMPLES, num_frames=4, frame_size=16, seed=5)
    return [gen[i] for i in range(NUM_SAMPLES)]


def _members(tar_path: Path) -> dict[str, tarfile.TarInfo]:
    with tarfile.open(tar_path) as tar:
        return {m.name: m for m in tar}


def _patch(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


# --- damaged shard files: a one-line error naming the file ---------------------------------------------


def _cut(at):
    return lambda data, members: data[: at(members)]


def _flip(at):
    def apply(data, members):
        data = bytearray(data)
        data[at(members)] ^= 0xFF
        return bytes(data)

    return apply


def _end_of_members(members) -> int:
    last = max(members.values(), key=lambda m: m.offset_data)
    return last.offset_data + last.size


SECOND = "000000004.000.png"  # a member in the middle of shard 1
SHARD_FAULTS = {
    "empty-file": (lambda data, members: b"", "not a readable tar file"),
    "cut-in-member-data": (_cut(lambda m: m[SECOND].offset_data + 7), "truncated: member '000000004.000.png'"),
    "cut-in-header": (_cut(lambda m: m[SECOND].offset + 100), "truncated or damaged after 1 samples"),
    "cut-between-members": (_cut(lambda m: m[SECOND].offset), "truncated or damaged after 1 samples"),
    "cut-before-end-block": (_cut(_end_of_members), "not a readable tar file"),
    "flipped-header-byte": (_flip(lambda m: m[SECOND].offset + 20), "truncated or damaged after 1 samples"),
    "flipped-extended-header-byte": (_flip(lambda m: m[SECOND].offset_data - 500), "not a readable tar file"),
    "random-bytes": (lambda data, members: np.random.default_rng(0).bytes(len(data)), "not a readable tar file"),
}


@pytest.fixture
def shards(tmp_path) -> Path:
    write_shards(_samples(), str(tmp_path / "shards"), samples_per_shard=PER_SHARD, log_every=0)
    return tmp_path / "shards"


@pytest.mark.parametrize("fault", SHARD_FAULTS)
def test_a_damaged_shard_file_is_a_one_line_error_naming_it(shards, fault):
    damage, expected = SHARD_FAULTS[fault]
    tar_path = shards / "shard-000001.tar"
    tar_path.write_bytes(damage(tar_path.read_bytes(), _members(tar_path)))
    with pytest.raises(ShardError) as err:
        ShardedVideoDataset(str(shards))
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"{tar_path}: ") and expected in message, message


@pytest.mark.parametrize("fault", ["index-cut-in-half", "index-lists-a-missing-shard"])
def test_a_damaged_index_is_a_one_line_error_naming_the_file(shards, fault):
    index = shards / "index.json"
    if fault == "index-cut-in-half":
        index.write_text(index.read_text()[: len(index.read_text()) // 2])
        named = index
    else:
        (shards / "shard-000001.tar").unlink()
        named = shards / "shard-000001.tar"
    with pytest.raises((ShardError, FileNotFoundError)) as err:
        ShardedVideoDataset(str(shards))
    assert "\n" not in str(err.value) and str(err.value).startswith(f"{named}: "), str(err.value)


def test_a_truncated_shard_stops_the_command_line_run_with_one_line(shards, tmp_path):
    """Through ``pretrain_mllm.py``: ``data error: <file>: ...``, exit status 2, no traceback."""
    root = tmp_path / "dataset"
    for split in ("train", "eval"):
        write_shards(_samples(), str(root / split), samples_per_shard=PER_SHARD, log_every=0)
    tar_path = root / "train" / "shard-000001.tar"
    tar_path.write_bytes(tar_path.read_bytes()[:2000])
    proc = run_pretrain(tmp_path, TINY, {"kind": "shards", "path": str(root), "max_images": 4})
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert last.startswith(f"data error: {tar_path}: not a readable tar file"), last


# --- damaged or undecodable samples: skipped, saying which file and member ----------------------------


def _damage_member(shards: Path, suffix: str, damage) -> None:
    """Overwrite (same length) the stored bytes of member ``suffix`` of sample BAD."""
    tar_path = shards / "shard-000000.tar"
    member = _members(tar_path)[f"{BAD:09d}.{suffix}"]
    with open(tar_path, "rb") as f:
        f.seek(member.offset_data)
        stored = f.read(member.size)
    damaged = damage(stored)
    assert len(damaged) == len(stored) and damaged != stored
    _patch(tar_path, member.offset_data, damaged)


def _flip_byte(data: bytes) -> bytes:
    data = bytearray(data)
    data[len(data) // 2] ^= 0x01
    return bytes(data)


def _change_question(data: bytes) -> bytes:
    """A still-valid JSON whose question starts with a capital letter instead."""
    data = bytearray(data)
    data[data.index(b'"question": "') + len(b'"question": "')] ^= 0x20
    return bytes(data)


def _write_with_frame(shards: Path, encoded: bytes) -> None:
    """Shards whose sample BAD stores ``encoded`` (checksum and all) as its middle frame."""
    samples = _samples()
    frames = [("png", encode_frame(f)) for f in samples[BAD]["frames"]]
    frames[1] = ("png", encoded)
    samples[BAD] = {"encoded_frames": frames, "question": samples[BAD]["question"], "answer": samples[BAD]["answer"]}
    write_shards(samples, str(shards), samples_per_shard=PER_SHARD, log_every=0)


PNG = encode_frame(np.zeros((16, 16, 3), np.uint8))
SAMPLE_FAULTS = {
    "flipped-image-byte": (lambda s: _damage_member(s, "001.png", _flip_byte), "frame 001.png: damaged"),
    "changed-question": (lambda s: _damage_member(s, "json", _change_question), "do not match their CRC-32"),
    "broken-json": (lambda s: _damage_member(s, "json", lambda d: b"{" + b" " * (len(d) - 1)), "not valid JSON"),
    "not-an-image": (lambda s: _write_with_frame(s, b"these bytes are no image"), "frame 001.png: cannot be decoded"),
    "truncated-png": (lambda s: _write_with_frame(s, PNG[: len(PNG) // 2]), "frame 001.png: cannot be decoded"),
    "empty-image-file": (lambda s: _write_with_frame(s, b""), "frame 001.png: cannot be decoded"),
}


@pytest.mark.parametrize("fault", SAMPLE_FAULTS)
def test_a_damaged_sample_is_skipped_naming_the_file_and_member(tmp_path, capsys, fault):
    shards = tmp_path / "shards"
    write_shards(_samples(), str(shards), samples_per_shard=PER_SHARD, log_every=0)
    clean = ShardedVideoDataset(str(shards))
    clean_samples = [clean[i] for i in range(NUM_SAMPLES)]
    clean.close()
    damage, expected = SAMPLE_FAULTS[fault]
    damage(shards)

    ds = ShardedVideoDataset(str(shards))
    where = f"{shards / 'shard-000000.tar'}:{BAD:09d}: "
    with pytest.raises(ShardError) as err:
        ds[BAD]
    assert "\n" not in str(err.value) and str(err.value).startswith(where) and expected in str(err.value)

    overrides = {"data.path": str(shards), "training.micro_batch_size": 6, "training.global_batch_size": 6}
    cfg = load_config(TINY, overrides)
    tokenizer = build_tokenizer("words")
    source = BatchSource(cfg, ds, tokenizer, 0, 1, seed=0, verbose=True)
    (batch,) = source.micro_batches(0, device="cpu", prefetch_next=False)
    source.close()
    assert source.bad_samples == 1
    skipped = [line for line in capsys.readouterr().out.splitlines() if line.startswith("skipping")]
    assert len(skipped) == 1 and skipped[0].startswith(f"skipping bad sample {BAD}: ShardError: {where}"), skipped
    # Every other sample is the one written; the damaged one is replaced by the next.
    (indices,) = micro_batches(0, 6, 6, 0, 1, NUM_SAMPLES, 0)
    used = [clean_samples[i + 1 if i == BAD else i] for i in indices]
    d, v = cfg.data, cfg.model.vision
    expected_batch = collate(
        used, tokenizer, d.seq_length, d.max_images, v.max_num_tiles, v.image_size, source.question_types
    )
    assert batch.keys() == expected_batch.keys()
    assert [k for k in batch if not torch.equal(batch[k], expected_batch[k])] == []


# --- interrupted generation: the next run regenerates, saying why --------------------------------------


class Interrupted(BaseException):
    """Stands for a kill or Ctrl-C: not an Exception, so no handler in the code under test catches it."""


def _config(root: Path, seed: int):
    overrides = {"data.train_samples": 5, "data.eval_samples": 3, "data.frame_size": 16, "data.max_images": 4}
    return load_config(TINY, {"data.path": str(root), "data.seed": seed, **overrides})


def _assert_generated(cfg) -> None:
    """``data.path`` holds exactly the clips of ``cfg``'s settings and says so."""
    d, root = cfg.data, Path(cfg.data.path)
    assert json.loads((root / SETTINGS).read_text()) == training_data._synthetic_settings(cfg)
    for split, count in (("train", d.train_samples), ("eval", d.eval_samples)):
        ds = ShardedVideoDataset(str(root / split))
        gen = VideoQAGenerator(count, d.max_images, d.frame_size, seed=d.seed, split=split)
        assert len(ds) == count
        for i in range(count):
            sample, want = ds[i], gen[i]
            assert np.array_equal(sample["frames"], want["frames"]) and sample["question"] == want["question"]
        ds.close()


def _interrupt_generation(monkeypatch, split: str, after: int) -> None:
    """Make the next generation of ``split`` stop after ``after`` clips."""

    class Stopping(VideoQAGenerator):
        def __iter__(self):
            for i in range(self.num_samples):
                if self.split == split and i == after:
                    raise Interrupted
                yield self[i]

    monkeypatch.setattr(training_data, "VideoQAGenerator", Stopping)


def _interrupt_settings_write(monkeypatch) -> None:
    real = os.replace

    def replace(src, dst):
        if Path(dst).name == SETTINGS:
            raise Interrupted
        real(src, dst)

    monkeypatch.setattr(training_data.os, "replace", replace)


INTERRUPTIONS = {
    "in-train-split": lambda mp: _interrupt_generation(mp, "train", 2),
    "before-eval-split": lambda mp: _interrupt_generation(mp, "eval", 0),
    "in-eval-split": lambda mp: _interrupt_generation(mp, "eval", 2),
    "writing-settings": _interrupt_settings_write,
}


@pytest.mark.parametrize("first_run", [False, True], ids=["after-a-settings-change", "first-generation"])
@pytest.mark.parametrize("point", INTERRUPTIONS)
def test_an_interrupted_generation_is_redone_by_the_next_run(tmp_path, monkeypatch, capsys, point, first_run):
    root = tmp_path / "data"
    original, changed = _config(root, seed=0), _config(root, seed=1)
    if not first_run:
        ensure_synthetic(original)
    with monkeypatch.context() as mp:
        INTERRUPTIONS[point](mp)
        with pytest.raises(Interrupted):
            ensure_synthetic(original if first_run else changed)  # a settings change, interrupted
    capsys.readouterr()
    ensure_synthetic(original)  # the next run, with the settings reverted (or the same ones)
    out = capsys.readouterr().out
    assert "regenerating (" in out and "holds no shards" not in out, out
    _assert_generated(original)


def test_a_damaged_generated_split_is_regenerated_naming_the_damage(tmp_path, capsys):
    cfg = _config(tmp_path / "data", seed=0)
    ensure_synthetic(cfg)
    tar_path = tmp_path / "data" / "train" / "shard-000000.tar"
    tar_path.write_bytes(tar_path.read_bytes()[:3000])
    capsys.readouterr()
    ensure_synthetic(cfg)
    out = capsys.readouterr().out
    assert f"regenerating ({tar_path}: " in out and "the synthetic video QA train split" in out, out
    assert "eval split" not in out  # the intact split is kept
    _assert_generated(cfg)


KILLED_GENERATION = """
import sys
from lvx_megatron.training.config import load_config
from lvx_megatron.training.data import ensure_synthetic
ensure_synthetic(load_config(sys.argv[1], {"data.path": sys.argv[2], "data.seed": 1, "data.train_samples": 2000,
                                           "data.frame_size": 16, "data.max_images": 4}))
"""


def test_a_generation_killed_midway_is_redone_by_the_next_run(tmp_path, capsys):
    root = tmp_path / "data"
    original = _config(root, seed=0)
    ensure_synthetic(original)
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLED_GENERATION, str(TINY), str(root)],
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)},
        stdout=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    while not (root / "train" / "shard-000000.tar").exists() or (root / "train" / "index.json").exists():
        assert time.time() < deadline and proc.poll() is None, "the generation ended before it could be killed"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)  # it starts no processes of its own
    proc.wait()
    capsys.readouterr()
    ensure_synthetic(original)
    assert "regenerating (no settings.json: an earlier generation did not finish)" in capsys.readouterr().out
    _assert_generated(original)


# --- a folder the generator did not write: refused, never deleted -------------------------------------


def _files(root: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _users_shards(root: Path) -> None:
    """``root/train`` and ``root/eval`` as tools/folder_to_wds.py writes a user's own shards."""
    for split in ("train", "eval"):
        write_shards(_samples(), str(root / split), samples_per_shard=PER_SHARD, log_every=0)


def _another_tools_shards(root: Path) -> None:
    from tools import make_video_qa

    make_video_qa.main(["--out", str(root), "--train", "4", "--eval", "4", "--frames", "4", "--frame-size", "16"])


FOREIGN_FOLDERS = {
    "user-shards": (_users_shards, "holds files that synthetic_video_qa did not write"),
    "a-file-of-the-user": (lambda root: (root / "notes.txt").write_text("mine"), "did not write"),
    "another-tools-output": (_another_tools_shards, "was written by tools/make_video_qa.py"),
}


@pytest.mark.parametrize("folder", FOREIGN_FOLDERS)
def test_the_generator_refuses_a_folder_it_did_not_write(tmp_path, folder):
    """data.kind left at synthetic_video_qa with data.path at other data: one line naming the folder and the
    settings to change; nothing in the folder deleted or rewritten (it used to regenerate train/ and eval/)."""
    root = tmp_path / "data"
    root.mkdir()
    make, reason = FOREIGN_FOLDERS[folder]
    make(root)
    before = _files(root)
    with pytest.raises(ConfigError) as err:
        ensure_synthetic(_config(root, seed=0))
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"config error: data.path: {root} "), message
    assert reason in message and "set data.kind" in message and "data.path to a new or empty folder" in message
    assert _files(root) == before


def test_a_foreign_folder_stops_the_command_line_run_with_one_line(tmp_path):
    """Through ``pretrain_mllm.py`` with the default data.kind: ``config error: data.path: ...``, exit status 2,
    the user's shards untouched."""
    root = tmp_path / "data"
    _users_shards(root)
    before = _files(root)
    proc = run_pretrain(tmp_path, TINY, {"path": str(root)})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1].startswith(f"config error: data.path: {root} holds files"), proc.stderr
    assert _files(root) == before


def test_a_folder_generated_before_markers_is_still_the_generators(tmp_path, capsys):
    """A folder an earlier version generated (its settings.json, no marker) is reused, and regenerated when
    the settings change."""
    root = tmp_path / "data"
    original, changed = _config(root, seed=0), _config(root, seed=1)
    ensure_synthetic(original)
    (root / MARKER).unlink()
    capsys.readouterr()
    ensure_synthetic(original)
    assert "generating" not in capsys.readouterr().out
    (root / MARKER).unlink()
    ensure_synthetic(changed)
    assert "regenerating (made with other data settings" in capsys.readouterr().out
    _assert_generated(changed)


def _user_clips(root: Path) -> None:
    (root / "train.jsonl").write_text('{"video": "mine.mp4", "question": "q", "answer": "a"}\n')


def _user_tars(root: Path) -> None:
    _users_shards(root)
    (root / "train" / "shard-000000.tar").rename(root / "train" / "mine.tar")


DATA_TOOLS = {
    "make_video_qa": (["--train", "4", "--eval", "4", "--frames", "4", "--frame-size", "16"], _users_shards),
    "make_video_clips": (["--train", "2", "--eval", "2", "--frames", "4", "--frame-size", "16"], _user_clips),
    "folder_to_wds": (["--images", ".", "--texts", "t.jsonl"], lambda root: _users_shards(root.parent)),
    "video_jsonl_to_energon": (["--input", "."], _user_tars),
}


@pytest.mark.parametrize("tool", DATA_TOOLS)
def test_the_data_tools_refuse_an_out_folder_they_did_not_write(tmp_path, tool):
    """The tools that write data overwrite (make_video_qa, make_video_clips, folder_to_wds) or delete
    (video_jsonl_to_energon: an earlier conversion's tars) only in a folder they wrote themselves."""
    args, make = DATA_TOOLS[tool]
    out = tmp_path / "data" / ("train" if tool == "folder_to_wds" else "")
    out.mkdir(parents=True, exist_ok=True)
    make(out)
    before = _files(tmp_path / "data")
    (tmp_path / "t.jsonl").write_text("")  # folder_to_wds's input
    (tmp_path / "a.mp4").write_bytes(b"not decoded while converting")  # video_jsonl_to_energon's input
    for name in ("train.jsonl", "eval.jsonl"):
        (tmp_path / name).write_text('{"video": "a.mp4", "question": "q", "answer": "a"}\n')
    proc = subprocess.run(
        [sys.executable, str(REPO / "tools" / f"{tool}.py"), "--out", str(out), *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)},
    )
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode != 0 and len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith(f"error: --out: {out} holds files that tools/{tool}.py did not write"), lines
    assert _files(tmp_path / "data") == before
