"""Video clips (mp4, webm, mkv) -> sampled frames, with PyAV (FFmpeg); and a folder of clips + JSONL as a dataset.

A clip's frames are its video stream's frames in presentation order, at times ``t_i`` (seconds from
the first frame). :func:`select_frames` picks which of them a sample uses (uniformly over the clip or a
``[start, end)`` window, or one every ``1/fps`` seconds); :func:`decode_clip` decodes only from the
keyframes before them up to them. See docs/data.md ("Video clips + JSONL").
"""

from __future__ import annotations

import bisect
import io
import json
import math
import os
from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from lvx_megatron.data.checks import PATH_CHARS, cut
from lvx_megatron.data.shards import sample_text_fields

CLIP_EXTENSIONS: tuple[str, ...] = (".mp4", ".webm", ".mkv")
SPLIT_FILES: dict[str, str] = {"train": "train.jsonl", "eval": "eval.jsonl"}
_TIME_SLACK = 1e-6  # seconds: timestamps are exact fractions, this only absorbs float rounding


class VideoError(ValueError):
    """A clip that cannot be used for a sample (missing, undecodable, shorter than asked); the message names it."""


def select_frames(
    times: Sequence[float],
    duration: float,
    num_frames: int,
    start: float = 0.0,
    end: float | None = None,
    fps: float | None = None,
) -> list[int]:
    """Indices into ``times`` (a clip's sorted frame times, seconds) of the frames a sample uses.

    The window is ``[start, end)`` (``end`` None: the clip's ``duration``). Without ``fps``: exactly
    ``num_frames`` frames, the middle frame of each of ``num_frames`` equal runs of the window's frames.
    With ``fps``: the frame shown at ``start, start + 1/fps, ...`` before the window's end, at most
    ``num_frames`` of them. ValueError (VideoError when the clip is too short) saying why otherwise.
    """
    if start < 0 or (end is not None and end <= start):
        raise ValueError(f"window [start, end] must have 0 <= start < end, got [{start}, {end}]")
    stop = duration if end is None else end
    if stop > duration + _TIME_SLACK:
        raise VideoError(f"the clip is {duration:.3f} s long, shorter than the window's end {end} s")
    window = [i for i, t in enumerate(times) if start - _TIME_SLACK <= t < stop - _TIME_SLACK]
    if fps is None:
        if len(window) < num_frames:
            raise VideoError(
                f"{len(window)} frames in [{start}, {stop:.3f}) s, fewer than the {num_frames} asked (data.max_images)"
            )
        # Run k of n equal runs covers window[k*K/n : (k+1)*K/n]; its middle frame is at (2k+1)*K/(2n).
        return [window[(2 * k + 1) * len(window) // (2 * num_frames)] for k in range(num_frames)]
    if fps <= 0:
        raise ValueError(f"fps must be > 0, got {fps}")
    if not window:
        raise VideoError(f"no frames in [{start}, {stop:.3f}) s")
    count = math.ceil((stop - start) * fps - _TIME_SLACK)
    if count > num_frames:
        raise ValueError(
            f"{count} frames at {fps} fps in [{start}, {stop:.3f}) s, more than data.max_images = {num_frames}"
        )
    picked, i = [], window[0]
    for k in range(count):
        at = start + k / fps
        while i + 1 <= window[-1] and times[i + 1] <= at + _TIME_SLACK:  # the frame on screen at time ``at``
            i += 1
        picked.append(i)
    return picked


def decode_clip(
    path: str,
    num_frames: int,
    start: float = 0.0,
    end: float | None = None,
    fps: float | None = None,
    data: bytes | None = None,
) -> np.ndarray:
    """The frames :func:`select_frames` picks from clip ``path``, uint8 [F, H, W, 3] RGB at the clip's size.

    With ``data`` (the clip's bytes, e.g. a member of an energon tar) the clip is read from memory and
    ``path`` only names it in messages.

    Two passes: the packets (not decoded) give the frame times and the keyframes; then each run of
    picked frames with no keyframe between them is decoded from the keyframe before its first frame
    to its last, so a few frames of a long clip cost a few keyframe intervals, not the whole clip.
    VideoError naming the file when it is missing, has no video stream or cannot be decoded; the
    sampling rules' errors also name it.
    """
    name = cut(path, PATH_CHARS)
    if data is None and not os.path.isfile(path):
        raise VideoError(f"{name}: clip not found")
    try:
        with av.open(path if data is None else io.BytesIO(data)) as container:
            if not container.streams.video:
                raise VideoError(f"{name}: no video stream")
            stream = container.streams.video[0]
            # Flush packets carry no timestamp and no frame.
            packets = [(p.pts, p.is_keyframe) for p in container.demux(stream) if p.pts is not None and p.size > 0]
            if not packets:
                raise VideoError(f"{name}: no video frames")
            pts = sorted(p for p, _ in packets)
            keyframes = sorted(p for p, key in packets if key)
            base = stream.time_base
            times = [float((p - pts[0]) * base) for p in pts]
            rate = stream.average_rate or stream.guessed_rate
            frame_s = float(Fraction(1) / rate) if rate else (times[-1] - times[0]) / max(len(times) - 1, 1)
            try:
                picked = select_frames(times, times[-1] + frame_s, num_frames, start, end, fps)
            except ValueError as exc:
                raise type(exc)(f"{name}: {exc}") from None
            wanted = sorted({pts[i] for i in picked})
            frames: dict[int, np.ndarray] = {}
            for run in _runs(wanted, keyframes):
                _decode_into(frames, container, stream, run, run[0])
            if missing := sorted(set(wanted) - frames.keys()):
                # Frames that need references from before their keyframe (open GOPs): decode from the start.
                _decode_into(frames, container, stream, missing, pts[0])
    except av.FFmpegError as exc:
        raise VideoError(f"{name}: cannot be decoded ({type(exc).__name__}: {exc})") from None
    if missing := sorted(set(wanted) - frames.keys()):  # the decoder gave other timestamps than the container
        raise VideoError(f"{name}: frames at pts {missing[:3]} listed but not decoded")
    return np.stack([frames[pts[i]] for i in picked])


def _decode_into(frames: dict[int, np.ndarray], container, stream, run: list[int], seek_to: int) -> None:
    """Decode from the keyframe at or before pts ``seek_to`` to ``run[-1]``, keeping the frames of ``run`` (pts)."""
    container.seek(seek_to, stream=stream, backward=True, any_frame=False)
    targets = set(run)
    for frame in container.decode(stream):
        if frame.pts in targets:
            frames[frame.pts] = frame.to_ndarray(format="rgb24")
        if frame.pts is not None and frame.pts >= run[-1]:
            break


def _runs(wanted: list[int], keyframes: list[int]) -> list[list[int]]:
    """``wanted`` (sorted pts) split where a keyframe lies after one wanted frame and at or before the next:
    there a seek skips decoding the frames between them."""
    runs: list[list[int]] = []
    for p in wanted:
        if runs and bisect.bisect_right(keyframes, p) == bisect.bisect_right(keyframes, runs[-1][-1]):
            runs[-1].append(p)
        else:
            runs.append([p])
    return runs


def write_clip(path: str, frames: np.ndarray, fps: int = 4) -> None:
    """Encode uint8 [F, H, W, 3] RGB frames as a lossless H.264 mp4 (libx264rgb, qp 0): it decodes to ``frames``."""
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8 [F, H, W, 3], got {frames.dtype} {frames.shape}")
    with av.open(path, "w", format="mp4") as container:
        stream = container.add_stream("libx264rgb", rate=fps)
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "rgb24"
        stream.options = {"qp": "0", "preset": "ultrafast"}
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())  # flush the encoder's delayed frames


class VideoJsonlDataset:
    """Map-style dataset over ``root/<split>.jsonl`` and its clips: ``ds[i]`` -> ``{"frames", "question", "answer"}``.

    One sample per non-blank line: ``{"video": "clips/a.mp4", "question": ..., "answer": ...}`` plus
    optional ``"start"``/``"end"`` (seconds) and ``"fps"`` (overrides ``fps``), ``"qtype"``; ``"clip"``
    may stand for ``"video"``, ``"prompt"``/``"response"`` for ``"question"``/``"answer"``. Clip paths
    are relative to ``root`` and must stay inside it, symlinks followed, unless ``allow_outside_paths``
    (:func:`clip_path`). A line that cannot make a sample raises ValueError naming ``file:line`` when it
    is read, so the reader can skip and count it. Frames are decoded on every read (no cache).
    """

    def __init__(
        self, root: str, split: str, num_frames: int, fps: float | None = None, allow_outside_paths: bool = False
    ) -> None:
        if split not in SPLIT_FILES:
            raise ValueError(f"split must be one of {list(SPLIT_FILES)}, got {split!r}")
        self.root, self.num_frames, self.fps, self.allow_outside_paths = root, num_frames, fps, allow_outside_paths
        self.jsonl = os.path.join(root, SPLIT_FILES[split])
        # Bytes: a line that is not UTF-8 is then one bad sample when read, not an unreadable file.
        with open(self.jsonl, "rb") as f:
            self._lines = [(n, line) for n, line in enumerate(f, start=1) if line.strip()]
        types = set()
        for _, line in self._lines:
            try:
                qtype = json.loads(line).get("qtype")
            except (ValueError, AttributeError):  # not JSON, or not an object
                continue  # reported when the line is read
            if isinstance(qtype, str):
                types.add(qtype)
        self.question_types: list[str] = sorted(types)

    def __len__(self) -> int:
        return len(self._lines)

    def where(self, i: int) -> str:
        """``file:line`` of sample ``i``, as its messages start."""
        return f"{self.jsonl}:{self._lines[i][0]}"

    def __getitem__(self, i: int) -> dict:
        if not -len(self) <= i < len(self):
            raise IndexError(f"sample index {i} out of range for {len(self)} samples in {self.jsonl!r}")
        where = self.where(i)
        rec = parse_clip_line(self._lines[i][1], where)
        path = clip_path(self.root, rec["video"], where, self.allow_outside_paths)
        fps = rec["fps"] if rec["fps"] is not None else self.fps
        try:
            frames = decode_clip(path, self.num_frames, rec["start"], rec["end"], fps)
        except ValueError as exc:
            raise type(exc)(f"{where}: {exc}") from None
        sample = {"frames": frames, "question": rec["question"], "answer": rec["answer"]}
        if rec["qtype"] is not None:
            sample["qtype"] = rec["qtype"]
        return sample


def clip_path(
    root: str, clip: str, where: str, allow_outside: bool, allow_with: str = "data.allow_outside_paths"
) -> str:
    """The path of ``clip`` (a JSONL line's clip, relative to ``root`` or absolute).

    Unless ``allow_outside``, it must resolve (symlinks followed) to a file inside ``root``: a dataset's
    lines read only its own folder's files. VideoError starting with ``where`` and naming ``allow_with``
    (the setting that allows it) otherwise.
    """
    path = os.path.join(root, clip)
    if allow_outside:
        return path
    resolved, base = Path(path).resolve(), Path(root).resolve()
    if not resolved.is_relative_to(base):
        shown = cut(repr(clip), PATH_CHARS), cut(str(resolved), PATH_CHARS)
        raise VideoError(
            f"{where}: clip {shown[0]} is {shown[1]}, outside the dataset folder {base}; {allow_with} allows clips "
            "outside it"
        )
    return path


def parse_clip_line(line: bytes | str, where: str) -> dict:
    """One JSONL line of a clips + JSONL folder -> ``{"video", "question", "answer", "start", "end", "fps", "qtype"}``.

    ``start`` is 0.0 and ``end``, ``fps``, ``qtype`` None when the line leaves them out. ValueError
    starting with ``where`` (``file:line``) when the line cannot make a sample.
    """
    try:
        rec = json.loads(line)
    except ValueError as exc:
        raise ValueError(f"{where}: invalid JSON ({exc})") from None
    if not isinstance(rec, dict):
        raise ValueError(f"{where}: not a JSON object")
    fields = clip_fields(rec, where)
    clip = rec.get("video", rec.get("clip"))
    if not isinstance(clip, str) or not clip:
        raise ValueError(f"{where}: missing or non-string field 'video' (or 'clip')")
    if not clip.lower().endswith(CLIP_EXTENSIONS):
        raise ValueError(f"{where}: field 'video' must name a {'/'.join(CLIP_EXTENSIONS)} file, got {cut(repr(clip))}")
    return {"video": clip, **fields}


def clip_fields(rec: dict, where: str) -> dict:
    """The text and window of a sample's metadata: ``{"question", "answer", "start", "end", "fps", "qtype"}``.

    Shared by the JSONL lines and the energon samples' ``.json``; ValueError starting with ``where``.
    """
    question, answer = sample_text_fields(rec, where)
    window = {}
    for key in ("start", "end", "fps"):
        value = rec.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
            raise ValueError(
                f"{where}: field {key!r} must be a number of seconds (fps: per second), got {cut(repr(value))}"
            )
        window[key] = value
    qtype = rec.get("qtype")
    return {
        "question": question,
        "answer": answer,
        "start": float(window["start"] or 0.0),
        "end": window["end"],
        "fps": window["fps"],
        "qtype": qtype if isinstance(qtype, str) else None,
    }
