"""Sharded video QA data: webdataset tar shards plus ``index.json``, read back with random access.

A sample ``<key>`` is stored as ``<key>.json`` (``{"question": str, "answer": str, "num_frames": F}``) and
its frames ``<key>.000.png``, ``<key>.001.png``, ... (png or jpg). See docs/data.md.
"""

from __future__ import annotations

import io
import json
import os
import re
import sys
import tarfile
import time
from collections.abc import Iterable

import numpy as np
from PIL import Image

INDEX_FILE = "index.json"
FORMAT_VERSION = 1
FRAME_FORMATS: tuple[str, ...] = ("png", "jpg")
_FRAME_RE = re.compile(r"^(\d{3,})\.(png|jpg|jpeg)$")


def encode_frame(frame: np.ndarray, image_format: str = "png") -> bytes:
    """uint8 [H, W, 3] -> PNG (lossless) or JPEG (quality 95) bytes."""
    if image_format not in FRAME_FORMATS:
        raise ValueError(f"image_format must be one of {list(FRAME_FORMATS)}, got {image_format!r}")
    buf = io.BytesIO()
    Image.fromarray(np.asarray(frame, dtype=np.uint8), mode="RGB").save(
        buf, format="PNG" if image_format == "png" else "JPEG", **({"quality": 95} if image_format == "jpg" else {})
    )
    return buf.getvalue()


def sample_text_fields(meta: dict, where: str) -> tuple[str, str]:
    """(question, answer) of a metadata dict that uses "question"/"prompt" and "answer"/"response"."""
    question = meta.get("question", meta.get("prompt"))
    answer = meta.get("answer", meta.get("response"))
    if not isinstance(question, str):
        raise ValueError(f"{where}: missing or non-string field 'question' (or 'prompt')")
    if not isinstance(answer, str):
        raise ValueError(f"{where}: missing or non-string field 'answer' (or 'response')")
    return question, answer


def write_shards(
    samples_iterable: Iterable[dict],
    out_dir: str,
    samples_per_shard: int = 1000,
    prefix: str = "shard",
    image_format: str = "png",
    log_every: int = 1000,
) -> dict:
    """Write samples to ``out_dir/<prefix>-%06d.tar`` with ``webdataset.ShardWriter`` and ``out_dir/index.json``.

    Each sample is ``{"frames": uint8 [F, H, W, 3], "question": str, "answer": str}``, or has
    ``"encoded_frames": [(ext, bytes), ...]`` instead of ``"frames"`` to store already-encoded images as-is.
    Keys are the zero-padded global sample index. Returns the index dict.
    """
    import webdataset as wds  # only the writer needs it

    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    if image_format not in FRAME_FORMATS:
        raise ValueError(f"image_format must be one of {list(FRAME_FORMATS)}, got {image_format!r}")
    if not re.fullmatch(r"[A-Za-z0-9_-]+", prefix):
        raise ValueError(
            f"prefix must be letters, digits, '_' or '-' (no dots: webdataset splits keys at dots), got {prefix!r}"
        )
    os.makedirs(out_dir, exist_ok=True)
    pattern = os.path.join(out_dir, f"{prefix}-%06d.tar")
    counts: dict[str, int] = {}
    total = 0
    start = time.time()
    # maxsize is unbounded so every shard holds exactly samples_per_shard samples (the last one fewer).
    writer = wds.ShardWriter(pattern, maxcount=samples_per_shard, maxsize=float("inf"), verbose=0, encoder=False)
    try:
        for i, sample in enumerate(samples_iterable):
            question, answer = sample_text_fields(sample, f"sample {i}")
            if "encoded_frames" in sample:
                encoded = [(ext.lower().lstrip("."), data) for ext, data in sample["encoded_frames"]]
            elif "frames" in sample:
                frames = np.asarray(sample["frames"])
                if frames.ndim == 3:
                    frames = frames[None]
                if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
                    raise ValueError(
                        f"sample {i}: frames must be uint8 [F, H, W, 3], got {frames.dtype} {frames.shape}"
                    )
                encoded = [(image_format, encode_frame(f, image_format)) for f in frames]
            else:
                raise ValueError(f"sample {i} lacks field 'frames' (or 'encoded_frames')")
            if not encoded:
                raise ValueError(f"sample {i} has no frames")
            meta = {"question": question, "answer": answer, "num_frames": len(encoded)}
            record = {"__key__": f"{i:09d}", "json": json.dumps(meta).encode("utf-8")}
            for j, (ext, data) in enumerate(encoded):
                record[f"{j:03d}.{ext}"] = data
            writer.write(record)
            name = os.path.basename(writer.fname)
            counts[name] = counts.get(name, 0) + 1
            total += 1
            if log_every and total % log_every == 0:
                print(
                    f"[write_shards] {total} samples, {len(counts)} shards, {time.time() - start:.1f}s", file=sys.stderr
                )
    finally:
        writer.close()
    if total == 0:
        os.remove(pattern % 0)  # ShardWriter opens its first shard eagerly
        raise ValueError("samples_iterable is empty: nothing to write")
    index = {
        "format": "lvx-video-qa-wds",
        "version": FORMAT_VERSION,
        "shards": [{"name": k, "num_samples": v} for k, v in counts.items()],
        "total": total,
    }
    with open(os.path.join(out_dir, INDEX_FILE), "w") as f:
        json.dump(index, f, indent=1)
    print(f"[write_shards] done: {total} samples in {len(counts)} shards under {out_dir}", file=sys.stderr)
    return index


def _scan_tar(path: str) -> list[tuple[str, dict[str, tuple[int, int]]]]:
    """[(key, {suffix: (data offset, size)})] of a shard in file order; reads headers only."""
    samples: list[tuple[str, dict[str, tuple[int, int]]]] = []
    with tarfile.open(path, "r:") as tar:
        for m in tar:
            if not m.isfile():
                continue
            base = os.path.basename(m.name)
            key, _, suffix = base.partition(".")
            key = os.path.join(os.path.dirname(m.name), key)
            if not samples or samples[-1][0] != key:
                samples.append((key, {}))
            samples[-1][1][suffix] = (m.offset_data, m.size)
    return samples


class ShardedVideoDataset:
    """Map-style dataset over a shard folder: ``len(ds)``, ``ds[i]`` -> ``{"frames", "question", "answer"}``.

    The member offsets of every tar are read once at construction, so any global sample index can be read
    directly (deterministic resume). Safe to use from DataLoader workers: files are opened per process.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        if not os.path.isdir(path):
            raise FileNotFoundError(f"shard folder {path!r} does not exist")
        index_path = os.path.join(path, INDEX_FILE)
        if os.path.exists(index_path):
            with open(index_path) as f:
                index = json.load(f)
            shards = [(s["name"], int(s["num_samples"])) for s in index["shards"]]
        else:
            names = sorted(n for n in os.listdir(path) if n.endswith(".tar"))
            if not names:
                raise FileNotFoundError(
                    f"{path!r} has neither {INDEX_FILE} nor .tar shards; write them with "
                    "lvx_megatron.data.shards.write_shards, tools/make_video_qa.py or tools/folder_to_wds.py"
                )
            shards = [(n, -1) for n in names]
        self.shard_names: list[str] = []
        self._entries: list[tuple[int, str, dict[str, tuple[int, int]]]] = []  # (shard idx, key, members)
        for si, (name, expected) in enumerate(shards):
            shard_path = os.path.join(path, name)
            if not os.path.exists(shard_path):
                raise FileNotFoundError(f"shard {name!r} listed in {index_path} is missing")
            members = _scan_tar(shard_path)
            if expected >= 0 and len(members) != expected:
                raise ValueError(f"shard {name!r} holds {len(members)} samples but {INDEX_FILE} says {expected}")
            self.shard_names.append(name)
            self._entries.extend((si, key, m) for key, m in members)
        self._files: dict[int, object] = {}
        self._pid = os.getpid()

    def __len__(self) -> int:
        return len(self._entries)

    def _file(self, shard: int):
        if os.getpid() != self._pid:  # forked worker: do not share file offsets with the parent
            self._files, self._pid = {}, os.getpid()
        if shard not in self._files:
            self._files[shard] = open(os.path.join(self.path, self.shard_names[shard]), "rb")  # noqa: SIM115
        return self._files[shard]

    def _read(self, shard: int, offset: int, size: int) -> bytes:
        f = self._file(shard)
        f.seek(offset)
        return f.read(size)

    def __getitem__(self, i: int) -> dict:
        if not -len(self) <= i < len(self):
            raise IndexError(f"sample index {i} out of range for {len(self)} samples in {self.path!r}")
        shard, key, members = self._entries[i]
        where = f"{self.shard_names[shard]}:{key}"
        if "json" not in members:
            raise ValueError(f"{where}: no {key}.json member")
        meta = json.loads(self._read(shard, *members["json"]))
        question, answer = sample_text_fields(meta, where)
        frame_members = sorted((int(m.group(1)), suffix) for suffix in members if (m := _FRAME_RE.match(suffix)))
        num_frames = int(meta.get("num_frames", len(frame_members)))
        if [j for j, _ in frame_members] != list(range(num_frames)):
            raise ValueError(
                f"{where}: expected frames 000..{num_frames - 1:03d}, found {[s for _, s in frame_members]}"
            )
        frames = []
        for _, suffix in frame_members:
            with Image.open(io.BytesIO(self._read(shard, *members[suffix]))) as im:
                frames.append(np.asarray(im.convert("RGB"), dtype=np.uint8))
        if len({f.shape for f in frames}) != 1:
            raise ValueError(f"{where}: frames differ in size {sorted({f.shape for f in frames})}")
        return {"frames": np.stack(frames), "question": question, "answer": answer}

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_files"] = {}  # open files do not pickle
        return state

    def close(self) -> None:
        """Close the open shard files."""
        for f in self._files.values():
            f.close()
        self._files = {}
