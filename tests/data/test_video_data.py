"""Video clips + JSONL (``data.kind: video_jsonl``): frame sampling, bad data, config errors, a training run.

Clips are encoded here with PyAV. Sampling is checked against every frame of the clip decoded
independently (plain ``container.decode``) and indexed by hand: both decode the same bitstream, so
they must agree exactly whatever the codec loses; the lossless writer is checked against its source.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest
import torch
import yaml
from train_harness import TINY, train_losses

from lvx_megatron.data import VideoJsonlDataset, VideoQAGenerator, build_tokenizer, decode_clip, write_clip
from lvx_megatron.data.batch import collate
from lvx_megatron.data.checks import PATH_CHARS
from lvx_megatron.data.sampler import micro_batches
from lvx_megatron.training.config import ConfigError, load_config
from lvx_megatron.training.data import BatchSource, prepare_datasets

REPO = TINY.parents[2]
FPS, NUM = 10, 20  # test clips: 20 frames at 10 fps, 2 s
# (container file, codec, pixel format, options): H.264 with keyframes every 5 frames and B-frames
# (decode order differs from presentation order; a window needs a seek), VP9 and FFV1.
CODECS = {
    "mp4": ("libx264", "yuv444p", {"crf": "0", "g": "5", "bf": "2"}),
    "webm": ("libvpx-vp9", "yuv444p", {"lossless": "1", "g": "5"}),
    "mkv": ("ffv1", "yuv444p", {}),
}


def _frames(num: int = NUM, height: int = 24, width: int = 32) -> np.ndarray:
    """Frames that differ from each other everywhere (so a wrong index cannot match)."""
    rng = np.random.default_rng(7)
    base = rng.integers(0, 256, size=(height, width, 3))
    return np.stack([(base + 37 * i) % 256 for i in range(num)]).astype(np.uint8)


def _encode(path: Path, frames: np.ndarray, ext: str, fps: int = FPS) -> None:
    codec, pix_fmt, options = CODECS[ext]
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt, stream.options = pix_fmt, options
        for f in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
        container.mux(stream.encode())


def _all_frames(path: Path) -> np.ndarray:
    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


# (start, end, fps) -> frame indices, worked out by hand: uniform takes the middle frame of each of n
# equal runs of the window's frames; fps the frame on screen at start + k / fps.
SAMPLINGS = {
    "uniform": ((0.0, None, None), 6, [1, 5, 8, 11, 15, 18]),
    "all frames": ((0.0, None, None), NUM, list(range(NUM))),
    "window": ((0.5, 1.5, None), 4, [6, 8, 11, 13]),
    "late window": ((1.2, None, None), 3, [13, 16, 18]),
    "fps": ((0.0, None, 4.0), 8, [0, 2, 5, 7, 10, 12, 15, 17]),
    "fps in a window": ((0.5, 1.5, 2.0), 4, [5, 10]),
    "fps above the clip's": ((1.5, 1.8, 20.0), 6, [15, 15, 16, 16, 17, 17]),
}


@pytest.mark.parametrize("ext", sorted(CODECS))
def test_sampled_frames_are_the_independently_decoded_frames(tmp_path, ext):
    path = tmp_path / f"clip.{ext}"
    _encode(path, _frames(), ext)
    reference = _all_frames(path)
    assert len(reference) == NUM
    for name, ((start, end, fps), n, indices) in SAMPLINGS.items():
        got = decode_clip(str(path), n, start, end, fps)
        assert np.array_equal(got, reference[indices]), name


def test_the_lossless_writer_decodes_to_its_frames(tmp_path):
    frames = _frames()
    write_clip(str(tmp_path / "clip.mp4"), frames, fps=FPS)
    assert np.array_equal(_all_frames(tmp_path / "clip.mp4"), frames)
    assert np.array_equal(decode_clip(str(tmp_path / "clip.mp4"), 4), frames[[2, 7, 12, 17]])


# --- bad data: skipped, counted and named -------------------------------------------------------------


def _bad_data(root: Path) -> tuple[list[dict], dict[int, str]]:
    """A JSONL whose lines 1, 3, 4, 5, 6, 7 are bad; returns the lines and what each bad one must say."""
    gen = VideoQAGenerator(4, num_frames=4, frame_size=16, seed=3)
    (root / "clips").mkdir(parents=True)
    for i in range(4):
        write_clip(str(root / "clips" / f"{i}.mp4"), gen[i]["frames"])
    write_clip(str(root / "clips" / "short.mp4"), gen[0]["frames"][:2])
    (root / "clips" / "garbage.mp4").write_bytes(os.urandom(3000))
    cut = (root / "clips" / "0.mp4").read_bytes()
    (root / "clips" / "cut.mp4").write_bytes(cut[: len(cut) // 2])
    good = lambda i: {"video": f"clips/{i}.mp4", "question": gen[i]["question"], "answer": gen[i]["answer"]}
    lines = [
        good(0),
        {**good(1), "video": "clips/missing.mp4"},
        good(1),
        {**good(2), "video": "clips/garbage.mp4"},
        {**good(2), "video": "clips/short.mp4"},
        {"video": "clips/2.mp4", "question": gen[2]["question"]},
        {**good(2), "video": "clips/cut.mp4"},
        {**good(2), "fps": 8},  # 8 frames at 8 fps over the 1 s clip: more than max_images
        good(2),
        good(3),
    ]
    expected = {
        1: "clips/missing.mp4: clip not found",
        3: "clips/garbage.mp4: cannot be decoded",
        4: "clips/short.mp4: 2 frames in [0.0, 0.500) s, fewer than the 4 asked (data.max_images)",
        5: "missing or non-string field 'answer'",
        6: "clips/cut.mp4: cannot be decoded",
        7: "8 frames at 8 fps in [0.0, 1.000) s, more than data.max_images = 4",
    }
    (root / "train.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    (root / "eval.jsonl").write_text(json.dumps(good(3)) + "\n")
    clean = [None if i in expected else _text_and_frames(gen[int(line["video"][6])]) for i, line in enumerate(lines)]
    return clean, expected


def _text_and_frames(sample: dict) -> dict:
    return {k: sample[k] for k in ("frames", "question", "answer")}


def test_bad_clips_and_lines_are_skipped_counted_and_named(tmp_path, capsys):
    root = tmp_path / "videos"
    clean, expected = _bad_data(root)
    n = len(clean)
    ds = VideoJsonlDataset(str(root), "train", num_frames=4)
    for i, message in expected.items():
        with pytest.raises(ValueError) as err:
            ds[i]
        assert str(err.value).startswith(f"{root / 'train.jsonl'}:{i + 1}: ") and message in str(err.value)
        assert "\n" not in str(err.value)

    overrides = {"data.kind": "video_jsonl", "data.path": str(root), "data.max_images": 4}
    overrides |= {"training.micro_batch_size": n, "training.global_batch_size": n}
    cfg = load_config(TINY, overrides)
    tokenizer = build_tokenizer("words")
    source = BatchSource(cfg, ds, tokenizer, 0, 1, seed=0, verbose=True)
    (batch,) = source.micro_batches(0, device="cpu", prefetch_next=False)
    source.close()
    (indices,) = micro_batches(0, n, n, 0, 1, n, 0)
    skipped = [line for line in capsys.readouterr().out.splitlines() if line.startswith("skipping")]
    # The batch holds every line once, so every bad line is met, and named once.
    named = {int(line.split()[3].rstrip(":")) for line in skipped}
    assert sorted(indices) == list(range(n)) and named == set(expected)
    assert source.bad_samples == len(skipped)
    for line in skipped:
        i = int(line.split()[3].rstrip(":"))
        assert f"{root / 'train.jsonl'}:{i + 1}: " in line and expected[i] in line, line

    def substitute(i: int) -> dict:  # the next good line, as BatchSource replaces a bad one
        while clean[i % n] is None:
            i += 1
        return clean[i % n]

    d, v = cfg.data, cfg.model.vision
    want = collate(
        [substitute(i) for i in indices], tokenizer, d.seq_length, d.max_images, v.max_num_tiles, v.image_size
    )
    assert all(torch.equal(batch[k], want[k]) for k in want)


def _one_clip_folder(tmp_path: Path, videos: list[str], **fields) -> tuple[Path, np.ndarray]:
    """``tmp_path/videos`` with ``clips/0.mp4`` and a train.jsonl naming each of ``videos`` (``fields`` on every
    line); also ``tmp_path/outside.mp4`` (the same frames) and ``clips/link.mp4``, a symlink to it."""
    frames = VideoQAGenerator(1, num_frames=4, frame_size=16, seed=3)[0]["frames"]
    root = tmp_path / "videos"
    (root / "clips").mkdir(parents=True)
    write_clip(str(root / "clips" / "0.mp4"), frames)
    write_clip(str(tmp_path / "outside.mp4"), frames)
    (root / "clips" / "link.mp4").symlink_to(tmp_path / "outside.mp4")
    (root / "clips" / "inner.mp4").symlink_to(root / "clips" / "0.mp4")
    text = {"question": "does any frame show red?", "answer": "yes"}
    (root / "train.jsonl").write_text("".join(json.dumps({"video": v, **text, **fields}) + "\n" for v in videos))
    (root / "eval.jsonl").write_text(json.dumps({"video": "clips/0.mp4", **text}) + "\n")
    return root, frames


def test_a_clip_outside_the_folder_is_a_bad_sample_naming_the_line(tmp_path):
    """``../x.mp4``, an absolute path and a symlink pointing out of data.path are bad samples (they were read
    silently), unless data.allow_outside_paths; paths and symlinks that stay inside are read."""
    outside = str(tmp_path / "outside.mp4")
    videos = ["clips/0.mp4", "../outside.mp4", outside, "clips/link.mp4", "clips/../clips/inner.mp4"]
    root, frames = _one_clip_folder(tmp_path, videos)
    jsonl = root / "train.jsonl"
    ds = VideoJsonlDataset(str(root), "train", num_frames=4)
    for i in (0, 4):
        assert np.array_equal(ds[i]["frames"], frames)
    for i in (1, 2, 3):
        with pytest.raises(ValueError) as err:
            ds[i]
        message = str(err.value)
        assert message.startswith(f"{jsonl}:{i + 1}: clip {videos[i]!r} is {outside}, outside the dataset folder")
        assert message.endswith("data.allow_outside_paths allows clips outside it") and "\n" not in message

    overrides = {"data.kind": "video_jsonl", "data.path": str(root), "data.max_images": 4}
    allowed = prepare_datasets(load_config(TINY, {**overrides, "data.allow_outside_paths": True}))["train"]
    assert all(np.array_equal(allowed[i]["frames"], frames) for i in range(len(videos)))
    with pytest.raises(ValueError, match="outside the dataset folder"):
        prepare_datasets(load_config(TINY, overrides))["train"][1]


def test_a_huge_value_is_cut_and_every_message_names_the_line(tmp_path, capsys):
    """A 1,000,000-character question, clip name or window: each skipped line says ``train.jsonl:LINE:`` and
    shows the start of the value, ``...`` and its length (a clip's path from PATH_MAX on), in one short log line
    (the whole value was printed, without the line, at every read)."""
    huge = "x" * 1_000_000
    root, _ = _one_clip_folder(tmp_path, ["clips/0.mp4"] * 2 + [huge + ".mp4"])
    lines = (root / "train.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    records[0]["question"] = huge  # not a word of the tokenizer's
    records[1]["question"] = "does any frame show red ? " * 40_000  # words it has, far more than seq_length
    records.append({**records[0], "question": "q", "start": huge})
    records.append({"video": "clips/0.mp4", "question": "does any frame show red?", "answer": "yes"})
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    n = len(records)
    overrides = {"data.kind": "video_jsonl", "data.path": str(root), "data.max_images": 4}
    cfg = load_config(TINY, overrides | {"training.micro_batch_size": n, "training.global_batch_size": n})
    ds = prepare_datasets(cfg)["train"]
    source = BatchSource(cfg, ds, build_tokenizer("words"), 0, 1, seed=0, verbose=True)
    source.micro_batches(0, device="cpu", prefetch_next=False)
    source.close()
    skipped = {int(line.split()[3].rstrip(":")): line for line in capsys.readouterr().out.splitlines()
               if line.startswith("skipping")}  # fmt: skip
    assert sorted(skipped) == [0, 1, 2, 3], skipped.keys()
    for i, shown in {0: "characters)", 1: "tokens (data.seq_length = 24)", 2: "characters)", 3: "characters)"}.items():
        line = skipped[i]
        assert f"{root / 'train.jsonl'}:{i + 1}: " in line and shown in line and len(line) < 2 * PATH_CHARS, line[:300]


# --- configuration errors: one line naming the field --------------------------------------------------


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            {"data.kind": "videos"},
            "config error: data.kind: Input should be 'synthetic_video_qa', 'shards', 'video_jsonl' or 'energon'",
        ),
        (
            {"data.kind": "video_jsonl", "data.frame_sampling": "every"},
            "config error: data.frame_sampling: Input should be 'uniform' or 'fps'",
        ),
        (
            {"data.kind": "video_jsonl", "data.frame_sampling": "fps"},
            "config error: data.fps: required by frame_sampling 'fps'",
        ),
        ({"data.kind": "video_jsonl", "data.fps": 2.0}, "config error: data.fps: used by frame_sampling 'fps' only"),
        (
            {"data.kind": "shards", "data.allow_outside_paths": True},
            "config error: data.allow_outside_paths: used by kind 'video_jsonl' only",
        ),
        (
            {"data.kind": "video_jsonl", "data.frame_sampling": "fps", "data.fps": -1},
            "config error: data.fps: Input should be greater than 0",
        ),
        (
            {"data.kind": "shards", "data.frame_sampling": "fps", "data.fps": 2.0},
            "config error: data.frame_sampling: used by kind 'video_jsonl' and 'energon' only",
        ),
    ],
)
def test_config_errors_name_the_field(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(TINY, overrides)
    assert str(err.value).startswith(message) and "\n" not in str(err.value), str(err.value)


def test_a_saved_run_config_with_every_default_spelled_out_loads_for_any_kind():
    """Checkpoints store the whole run config; export and resume load it back, defaults and all."""
    cfg = load_config(TINY, {"data.frame_sampling": "uniform", "data.fps": None})
    assert cfg.data.kind == "synthetic_video_qa" and cfg.data.frame_sampling == "uniform"


def test_missing_or_empty_jsonl_files_are_config_errors(tmp_path):
    cfg = load_config(TINY, {"data.kind": "video_jsonl", "data.path": str(tmp_path)})
    (tmp_path / "train.jsonl").write_text("\n")
    with pytest.raises(ConfigError, match=rf"^config error: data.path: {tmp_path} holds no eval.jsonl "):
        prepare_datasets(cfg)
    (tmp_path / "eval.jsonl").write_text('{"video": "a.mp4", "question": "q", "answer": "a"}\n')
    with pytest.raises(ConfigError, match=rf"^config error: data.path: {tmp_path / 'train.jsonl'} holds no samples"):
        prepare_datasets(cfg)


def test_a_line_that_is_not_utf8_json_is_a_bad_sample_naming_the_line(tmp_path):
    (tmp_path / "train.jsonl").write_bytes(b'{"video": "a.mp4", "question": "q", "answer": "a"}\n\xff\xfe{}\n')
    ds = VideoJsonlDataset(str(tmp_path), "train", num_frames=4)
    with pytest.raises(ValueError, match=rf"^{tmp_path / 'train.jsonl'}:2: invalid JSON"):
        ds[1]


# --- the tool and a training run through pretrain_mllm.py ----------------------------------------------


def _train(tmp_path: Path, name: str, config: Path, data: dict) -> list[float]:
    """3 steps of ``config`` with ``data`` fields through pretrain_mllm.py on 2 gloo ranks, CP 2; the losses."""
    tree = yaml.safe_load(config.read_text())
    tree["data"].update(data)
    tree["training"].update(micro_batch_size=4, global_batch_size=8, train_iters=3, lr_warmup_iters=1, log_interval=1)
    tree["training"].update(eval_interval=0, eval_iters=1)
    tree["checkpoint"], tree["logging"] = {}, {"wandb_mode": "disabled", "run_dir": str(tmp_path / name)}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(tree))
    launch = [sys.executable, "-m", "lvx_megatron.torchrun", "--standalone", "--nproc-per-node=2"]
    proc = subprocess.run(
        [*launch, str(REPO / "pretrain_mllm.py"), "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "(TP 1, CP 2, PP 1, DP 1)" in proc.stdout
    return train_losses(tmp_path / name)


def test_generated_clips_train_through_pretrain_mllm_as_the_synthetic_set_does(tmp_path):
    """tools/make_video_clips.py's clips decode to the generator's frames, and examples/configs/tiny-video.yaml
    trains on them with the losses of the same samples read from the generated shards (tiny.yaml)."""
    clips = tmp_path / "clips"
    tool = [sys.executable, str(REPO / "tools" / "make_video_clips.py"), "--out", str(clips), "--train", "16"]
    proc = subprocess.run([*tool, "--eval", "8", "--seed", "2"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    ds = VideoJsonlDataset(str(clips), "eval", num_frames=4)
    gen = VideoQAGenerator(8, num_frames=4, frame_size=32, seed=2, split="eval")
    assert len(ds) == 8 and ds.question_types == ["count", "most", "seen"]
    assert all(
        np.array_equal(ds[i]["frames"], gen[i]["frames"]) and ds[i]["answer"] == gen[i]["answer"] for i in range(8)
    )

    video = _train(tmp_path, "video", TINY.parent / "tiny-video.yaml", {"path": str(clips), "seed": 2})
    synthetic = {"path": str(tmp_path / "generated"), "seed": 2, "train_samples": 16, "eval_samples": 8}
    shards = _train(tmp_path, "shards", TINY, synthetic)
    assert len(video) == 3 and all(np.isfinite(video)), video
    assert video == pytest.approx(shards, rel=1e-6)
