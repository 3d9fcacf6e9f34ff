"""data.kind energon: clips + JSONL -> an energon dataset (tools/video_jsonl_to_energon.py, energon prepare),
read by energon's loaders sharded over DP ranks only, exact resume from the checkpointed loader state, and
bad samples skipped, counted and named."""

import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from train_harness import TINY, run_pretrain, train_losses

from lvx_megatron.data import VideoQAGenerator, build_tokenizer, write_clip
from lvx_megatron.data.energon import ClipSettings, prepare_command, train_loader, worker_config
from lvx_megatron.launch import spawn_gloo
from lvx_megatron.training.config import ConfigError, load_config
from lvx_megatron.training.data import DataError, EnergonBatchSource, prepare_datasets

REPO = TINY.parents[2]
ENERGON_TINY = TINY.parent / "tiny-energon.yaml"


def _run(*cmd: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> tuple[Path, Path, str]:
    """Generated mp4 clips + JSONL (with a line lacking its answer, one naming a missing clip and one a clip
    outside the folder), converted by the tool; returns (clips folder, energon dataset, the tool's stderr)."""
    root = tmp_path_factory.mktemp("energon")
    clips = root / "clips"
    _run(sys.executable, str(REPO / "tools" / "make_video_clips.py"), "--out", str(clips), "--train", "64")
    with open(clips / "train.jsonl", "a") as f:
        f.write(json.dumps({"video": "clips/train-000000.mp4", "question": "what?"}) + "\n")
        f.write(json.dumps({"video": "clips/gone.mp4", "question": "what?", "answer": "yes"}) + "\n")
        f.write(json.dumps({"video": "../outside.mp4", "question": "what?", "answer": "yes"}) + "\n")
    (root / "outside.mp4").write_bytes((clips / "clips" / "train-000000.mp4").read_bytes())
    out = root / "energon"
    tool = [sys.executable, str(REPO / "tools" / "video_jsonl_to_energon.py"), "--input", str(clips)]
    proc = _run(*tool, "--out", str(out), "--samples-per-shard", "16")
    return clips, out, proc.stderr


def test_the_tool_writes_a_prepared_energon_dataset_and_names_the_lines_it_skips(dataset):
    clips, out, log = dataset
    assert f"{clips}/train.jsonl:65: missing or non-string field 'answer' (or 'response')" in log
    assert f"{clips}/train.jsonl:66: {clips}/clips/gone.mp4: clip not found" in log
    outside = f"clip '../outside.mp4' is {clips.parent / 'outside.mp4'}, outside the dataset folder {clips}"
    assert f"{clips}/train.jsonl:67: {outside}; --allow-outside-paths allows clips outside it" in log
    assert "64 train and 256 eval samples (3 lines skipped)" in log
    assert "energon prepare " in log  # the command a user can re-run
    assert (out / ".nv-meta" / "dataset.yaml").read_text().split() == [
        "__module__:",
        "megatron.energon",
        "__class__:",
        "CrudeWebdataset",
    ]
    assert sorted(p.name for p in (out / "train").glob("*.tar")) == [f"shard-00000{i}.tar" for i in range(4)]
    assert json.loads((out / "question_types.json").read_text()) == ["count", "most", "seen"]


def _tiny_energon(data: Path, run_dir: Path, **overrides) -> dict:
    base = {
        "data.path": str(data),
        "data.num_workers": 1,
        "training.micro_batch_size": 2,
        "training.global_batch_size": 8,
        "training.train_iters": 4,
        "training.lr_warmup_iters": 1,
        "training.log_interval": 1,
        "training.eval_interval": 0,
        "training.eval_iters": 1,
        "training.eval_without_vision": False,
        "checkpoint.save": None,
        "checkpoint.load": None,
        "checkpoint.save_interval": 0,
        "logging.run_dir": str(run_dir),
        "logging.wandb_mode": "disabled",
    }
    return {**base, **overrides}


def _runs_and_first_batch(rank: int, world_size: int, runs: list[dict]) -> dict:
    """Worker: train each run in turn; returns this rank's (DP rank, CP rank, tokens, pixel sum) of the first
    run's iteration 0."""
    from megatron.core import parallel_state

    from lvx_megatron.training.loop import Trainer

    seen = {}
    for n, overrides in enumerate(runs):
        trainer = Trainer(load_config(ENERGON_TINY, overrides))
        if n == 0:
            load = trainer.train_source._load

            def recording(iteration, load=load):
                batches = load(iteration)
                if iteration == 0:
                    seen["dp"] = parallel_state.get_data_parallel_rank()
                    seen["cp"] = parallel_state.get_context_parallel_rank()
                    seen["tokens"] = batches[0]["tokens"].tolist()
                    seen["pixels"] = float(batches[0]["pixel_values"].double().sum())
                return batches

            trainer.train_source._load = recording
        try:
            trainer.run()
        finally:
            trainer.close()
    return seen


def test_cp2_dp2_resume_from_the_saved_loader_state_gives_the_uninterrupted_losses(dataset, tmp_path):
    """4 gloo ranks (CP 2 x DP 2, energon workers decoding): stop at 2 and resume -> the straight run's losses;
    the CP ranks of a replica read the same samples, the two replicas different ones."""
    _, data, _ = dataset
    ckpt = tmp_path / "ckpt"
    runs = [
        _tiny_energon(data, tmp_path / "straight"),
        _tiny_energon(data, tmp_path / "stop", **{"checkpoint.save": str(ckpt), "training.exit_interval": 2}),
        _tiny_energon(data, tmp_path / "resume", **{"checkpoint.load": str(ckpt)}),
    ]
    ranks = spawn_gloo(4, _runs_and_first_batch, runs)
    straight = train_losses(tmp_path / "straight")
    assert len(straight) == 4 and all(np.isfinite(straight)), straight
    assert train_losses(ckpt) == straight[:2]
    assert train_losses(tmp_path / "resume") == pytest.approx(straight[2:], rel=1e-6)
    by_place = {(r["dp"], r["cp"]): (r["tokens"], r["pixels"]) for r in ranks}
    assert sorted(by_place) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert by_place[0, 0] == by_place[0, 1] and by_place[1, 0] == by_place[1, 1]
    assert by_place[0, 0] != by_place[1, 0]


def _bad_dataset(root: Path) -> Path:
    """An energon dataset whose val split holds 2 good clips between bad samples of every kind."""
    gen = VideoQAGenerator(3, num_frames=4, frame_size=32, seed=0, split="eval")
    good, short = root / "good.mp4", root / "short.mp4"
    write_clip(str(good), gen[0]["frames"])
    write_clip(str(short), gen[1]["frames"][:2])
    mp4, text = good.read_bytes(), {"question": "does any frame show green?", "answer": "yes"}
    samples = [
        ({"mp4": mp4[: len(mp4) // 3]}, {**text, "source": "a.jsonl:1 cut.mp4"}),  # undecodable
        ({"mp4": mp4}, text),
        ({}, text),  # no clip member
        ({"mp4": short.read_bytes()}, text),  # 2 frames, 4 asked
        ({"mp4": mp4}, {"question": "what?"}),  # no answer
        ({"mp4": mp4}, {**text, "start": 2.0, "end": 1.0}),  # a window that is not one
        ({"mp4": mp4}, text),
    ]
    out = root / "bad"
    for part in ("train", "val"):
        (out / part).mkdir(parents=True)
        with wds.TarWriter(str(out / part / "shard-000000.tar")) as sink:
            for i, (clip, meta) in enumerate(samples):
                sink.write({"__key__": f"{part}-{i:03d}", "json": json.dumps(meta).encode(), **clip})
    energon = Path(sys.executable).with_name("energon")  # the CLI, as a user runs it
    _run(str(energon), "prepare", *prepare_command(str(out)))
    return out


def test_bad_energon_samples_are_skipped_counted_and_named(tmp_path, capsys):
    data = _bad_dataset(tmp_path)
    overrides = {"data.path": str(data), "data.num_workers": 0, "data.max_bad_samples": 5}
    overrides.update({"training.micro_batch_size": 2, "training.global_batch_size": 2})
    cfg = load_config(ENERGON_TINY, overrides)
    assert prepare_datasets(cfg) == {}
    source = EnergonBatchSource(cfg, "eval", build_tokenizer("words"), 0, 1, verbose=True)
    try:
        (batch,) = source.micro_batches(0, torch.device("cpu"), prefetch_next=False)
        source.micro_batches(0, torch.device("cpu"), prefetch_next=False)  # the next evaluation: the same samples
    finally:
        source.close()
    assert source.bad_samples == 5 and batch["tokens"].shape[0] == 2  # each bad sample counted once
    log = capsys.readouterr().out
    assert log.count("skipping bad sample") == 5, log
    for key, reason in [
        ("val-000", "VideoError: sample val-000 (a.jsonl:1 cut.mp4): val-000.mp4: cannot be decoded"),
        ("val-002", "VideoError: sample val-002: no clip (mp4/webm/mkv member)"),
        ("val-003", "VideoError: sample val-003: val-003.mp4: 2 frames in [0.0, 0.500) s, fewer than the 4 asked"),
        ("val-004", "ValueError: sample val-004: missing or non-string field 'answer' (or 'response')"),
        ("val-005", "ValueError: sample val-005: val-005.mp4: window [start, end] must have 0 <= start < end"),
    ]:
        assert f"skipping bad sample {data / 'val' / 'shard-000000.tar'}:{key}: {reason}" in log, log

    strict = load_config(ENERGON_TINY, {**overrides, "data.max_bad_samples": 4})
    source = EnergonBatchSource(strict, "eval", build_tokenizer("words"), 0, 1, verbose=False)
    try:
        with pytest.raises(DataError, match=r"5 unreadable or invalid samples \(more than data.max_bad_samples = 4\)"):
            source.micro_batches(0, torch.device("cpu"), prefetch_next=False)
    finally:
        source.close()


def _bad_samples_saved_and_restored(rank: int, world_size: int, data: str) -> dict:
    """Worker: a train source reads iteration 0 and saves its data state; a second one restores it and reads
    iterations 1 to 4 (a full pass more over the 7 samples)."""
    overrides = {"data.path": data, "data.num_workers": 0, "data.shuffle_buffer_size": 1}
    cfg = load_config(ENERGON_TINY, overrides | {"training.micro_batch_size": 2, "training.global_batch_size": 2})
    tokenizer = build_tokenizer("words")
    first = EnergonBatchSource(cfg, "train", tokenizer, 0, 1, verbose=False)
    try:
        first.micro_batches(0, torch.device("cpu"), prefetch_next=False)
        state = first.data_state(1)
    finally:
        first.close()
    resumed = EnergonBatchSource(cfg, "train", tokenizer, 0, 1, verbose=False)
    try:
        resumed.restore(state)
        restored = resumed.bad_samples
        for iteration in range(1, 5):
            resumed.micro_batches(iteration, torch.device("cpu"), prefetch_next=False)
    finally:
        resumed.close()
    return {"saved": first.bad_samples, "restored": restored, "final": resumed.bad_samples, "state": state}


def test_the_energon_bad_sample_count_is_saved_and_goes_on_after_a_restore(tmp_path):
    data = _bad_dataset(tmp_path)
    got = spawn_gloo(1, _bad_samples_saved_and_restored, str(data))[0]
    keys = got["state"]["bad_samples"]["keys"]
    assert got["saved"] == got["restored"] == len(keys) > 0 and got["final"] == 5, got
    assert all(k.startswith(f"{data / 'train' / 'shard-000000.tar'}:train-00") for k in keys), keys


def _damaged_copy(dataset, tmp_path: Path, fault: str) -> tuple[Path, Path]:
    """A copy of the converted dataset whose ``val/shard-000000.tar`` is deleted, cut in half, or has the tar
    header of its sample 3 zeroed; returns (copy, that tar)."""
    data = tmp_path / "energon"
    shutil.copytree(dataset[1], data)
    tar_path = data / "val" / "shard-000000.tar"
    if fault == "deleted":
        tar_path.unlink()
    elif fault == "truncated":
        tar_path.write_bytes(tar_path.read_bytes()[: tar_path.stat().st_size // 2])
    else:
        with tarfile.open(tar_path) as tar:
            header = next(m for m in tar if m.name.startswith("val-000000003.")).offset
        with open(tar_path, "r+b") as f:
            f.seek(header)
            f.write(bytes(tarfile.BLOCKSIZE))
    return data, tar_path


@pytest.mark.parametrize(("fault", "message"), [("deleted", "missing"), ("truncated", "truncated: ")])
def test_a_missing_or_truncated_tar_is_a_one_line_data_error_naming_it(dataset, tmp_path, fault, message):
    """When the loaders are built, before any read (it was a 216/239-line traceback from the loader)."""
    data, tar_path = _damaged_copy(dataset, tmp_path, fault)
    cfg = load_config(ENERGON_TINY, {"data.path": str(data), "data.num_workers": 0})
    with pytest.raises(DataError) as err:
        EnergonBatchSource(cfg, "eval", build_tokenizer("words"), 0, 1, verbose=False)
    assert str(err.value).startswith(f"{tar_path}: {message}") and "\n" not in str(err.value), str(err.value)


def test_a_truncated_tar_stops_the_command_line_run_with_one_line(dataset, tmp_path):
    data, tar_path = _damaged_copy(dataset, tmp_path, "truncated")
    proc = run_pretrain(tmp_path, ENERGON_TINY, {"path": str(data), "num_workers": 0})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1].startswith(f"data error: {tar_path}: truncated: "), proc.stderr


def test_a_damaged_tar_header_is_a_bad_sample_naming_the_tar(dataset, tmp_path, capsys):
    """A sample whose tar members cannot be read is skipped and counted like an undecodable clip, its message
    naming the tar and the sample's place in it; the samples around it are read."""
    data, tar_path = _damaged_copy(dataset, tmp_path, "header")
    overrides = {"data.path": str(data), "data.num_workers": 0}
    cfg = load_config(ENERGON_TINY, overrides | {"training.micro_batch_size": 8, "training.global_batch_size": 8})
    source = EnergonBatchSource(cfg, "eval", build_tokenizer("words"), 0, 1, verbose=True)
    try:
        (batch,) = source.micro_batches(0, torch.device("cpu"), prefetch_next=False)
    finally:
        source.close()
    assert source.bad_samples == 1 and batch["tokens"].shape[0] == 8
    skipped = [line for line in capsys.readouterr().out.splitlines() if line.startswith("skipping")]
    assert skipped == [
        f"skipping bad sample {tar_path}:#3: ShardError: {tar_path}: sample 3 of it cannot be read "
        f"(ValueError: Unexpected end of tar file: val/shard-000000.tar) (1 so far)"
    ], skipped


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"data.path": "/nonexistent/energon"}, "config error: data.path: /nonexistent/energon is neither a prepared"),
        ({"data.kind": "shards", "data.num_workers": 4}, "config error: data.num_workers: used by kind 'energon' only"),
        ({"data.num_workers": -1}, "config error: data.num_workers: Input should be greater than or equal to 0"),
    ],
)
def test_energon_config_errors_name_the_field(overrides, message):
    with pytest.raises(ConfigError) as err:
        prepare_datasets(load_config(ENERGON_TINY, overrides))
    assert str(err.value).startswith(message) and "\n" not in str(err.value), str(err.value)


def test_a_metadataset_blend_is_read_with_its_weights(dataset, tmp_path):
    """A metadataset YAML blending the dataset and the bad one 3 : 1: samples come from each in that ratio, and
    training reads the blend (the bad one's bad samples counted)."""
    _, data, _ = dataset
    bad = _bad_dataset(tmp_path)
    blend = tmp_path / "blend.yaml"
    blend.write_text(
        "__module__: megatron.energon\n__class__: MetadatasetV2\nsplits:\n"
        f"  train:\n    blend:\n      - weight: 3\n        path: {data}\n      - weight: 1\n        path: {bad}\n"
        f"  val:\n    path: {data}\n"
    )
    loader = train_loader(str(blend), ClipSettings(4), worker_config(0, 1, 0, 0), 100, 100)
    keys = [sample.__key__ for sample, _ in zip(loader, range(400), strict=False)]
    from_good = sum(len(k) == len("train-000000000") for k in keys) / len(keys)
    assert 0.68 < from_good < 0.82, from_good

    cfg = load_config(ENERGON_TINY, {"data.path": str(blend), "data.num_workers": 0})
    source = EnergonBatchSource(cfg, "train", build_tokenizer("words"), 0, 1, verbose=False)
    try:
        batches = source.micro_batches(0, torch.device("cpu"), prefetch_next=False)
    finally:
        source.close()
    assert len(batches) == 1 and batches[0]["tokens"].shape[0] == 32 and source.bad_samples > 0


def test_a_resume_with_another_dp_size_or_worker_count_is_a_config_error(dataset):
    _, data, _ = dataset
    cfg = load_config(ENERGON_TINY, {"data.path": str(data), "data.num_workers": 0})
    source = EnergonBatchSource(cfg, "train", build_tokenizer("words"), 0, 1, verbose=False)
    try:
        with pytest.raises(ConfigError, match="state is for 2 data-parallel ranks, this run has 1"):
            source.restore({"kind": "energon", "dp_size": 2, "num_workers": 0, "states": [None, None]})
        with pytest.raises(ConfigError, match=r"data\.num_workers: the checkpoint's energon loader state is for 2"):
            source.restore({"kind": "energon", "dp_size": 1, "num_workers": 2, "states": [None]})
    finally:
        source.close()
