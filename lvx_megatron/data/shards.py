"""Sharded video QA data: webdataset tar shards plus ``index.json``, read back with random access.

A sample ``<key>`` is stored as ``<key>.json`` (``{"question": str, "answer": str, "num_frames": F, "crc32": {...}}``)
and its frames ``<key>.000.png``, ``<key>.001.png``, ... (png or jpg). See docs/data.md.
"""

from __future__ import annotations

import io
import json
import mmap
import os
import re
import sys
import tarfile
import time
import zlib
from collections.abc import Iterable

import numpy as np
from PIL import Image

INDEX_FILE = "index.json"
FORMAT_VERSION = 1
FRAME_FORMATS: tuple[str, ...] = ("png", "jpg")
_FRAME_RE = re.compile(r"^(\d{3,})\.(png|jpg|jpeg)$")
TEXT_CRC = "text"  # the key of the question/answer checksum in a sample's "crc32"


class ShardError(ValueError):
    """A shard folder, shard file or stored sample that cannot be read as written; the message names it."""


def text_crc32(question: str, answer: str) -> int:
    """CRC-32 of a sample's text, stored with it so that a damaged ``.json`` member is detected."""
    return zlib.crc32(f"{question}\n{answer}".encode())


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
    ``"encoded_frames": [(ext, bytes), ...]`` instead of ``"frames"`` to store already-encoded images as-is,
    and optionally ``"qtype"``: its question type (kept with it; the index lists every type, so
    accuracy can be reported per type). Keys are the zero-padded global sample index. Returns the index dict.
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
    qtypes: set[str] = set()
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
            frames_by_suffix = {f"{j:03d}.{ext}": data for j, (ext, data) in enumerate(encoded)}
            # Checksums of every stored part: damaged bytes are found on read, never decoded as a sample.
            crc = {suffix: zlib.crc32(data) for suffix, data in frames_by_suffix.items()}
            crc[TEXT_CRC] = text_crc32(question, answer)
            meta = {"question": question, "answer": answer, "num_frames": len(encoded), "crc32": crc}
            if "qtype" in sample:
                meta["qtype"] = str(sample["qtype"])
                qtypes.add(meta["qtype"])
            record = {"__key__": f"{i:09d}", "json": json.dumps(meta).encode("utf-8"), **frames_by_suffix}
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
        "question_types": sorted(qtypes),
    }
    # Written last and atomically: its presence marks the folder complete.
    index_path = os.path.join(out_dir, INDEX_FILE)
    with open(f"{index_path}.tmp", "w") as f:
        json.dump(index, f, indent=1)
    os.replace(f"{index_path}.tmp", index_path)
    print(f"[write_shards] done: {total} samples in {len(counts)} shards under {out_dir}", file=sys.stderr)
    return index


_Members = list[tuple[str, dict[str, tuple[int, int]]]]
_FILE_TYPES = (b"0", b"\0", b"7")  # regular files (tarfile's isfile())
_OTHER_TYPES = (b"1", b"2", b"3", b"4", b"5", b"6")  # links, devices, folders, FIFOs: no sample data
_PAX_KEYS = {"path", "size", "mtime", "atime", "ctime", "uid", "gid", "uname", "gname"}  # what the fast scan reads past
_scanned: dict[tuple[str, int, int], _Members] = {}  # (path, size, mtime_ns) -> members: one scan a process


def _add_member(samples: _Members, name: str, offset: int, size: int) -> None:
    base = os.path.basename(name)
    key, _, suffix = base.partition(".")
    key = os.path.join(os.path.dirname(name), key)
    if not samples or samples[-1][0] != key:
        samples.append((key, {}))
    samples[-1][1][suffix] = (offset, size)


def _pax_records(data: bytes) -> dict[str, str] | None:
    """A pax extended header's ``key=value`` records, or None when they do not parse."""
    records, at = {}, 0
    while at < len(data):
        space = data.find(b" ", at)
        if space < 0 or not data[at:space].isdigit():
            return None
        length = int(data[at:space])
        record = data[space + 1 : at + length]
        if length <= 0 or not record.endswith(b"\n") or b"=" not in record:
            return None
        name, _, value = record[:-1].partition(b"=")
        records[name.decode("utf-8", "replace")] = value.decode("utf-8", "replace")
        at += length
    return records


def _scan_headers(view: memoryview) -> _Members | None:
    """:func:`_scan_tar` on the ustar and pax headers webdataset and tarfile write, reading the
    512-byte headers directly (Python's tarfile takes seconds on a shard of a thousand samples).
    None on anything else (GNU long names, global or damaged headers, base-256 sizes, truncation):
    the caller then scans with tarfile, whose messages name the problem."""
    block, total = tarfile.BLOCKSIZE, len(view)
    samples: _Members = []
    at, pending = 0, {}
    while at + block <= total:
        header = view[at : at + block]
        if not any(header):
            return samples if not pending else None  # the end-of-archive block
        raw = bytes(header)
        stored = raw[148:156].split(b"\0", 1)[0].strip()
        if not stored or not stored.isdigit() or int(stored, 8) != sum(raw) - sum(raw[148:156]) + 8 * 32:
            return None
        size_field = raw[124:136].split(b"\0", 1)[0].strip()
        if raw[124] & 0x80 or (size_field and not size_field.isdigit()):
            return None
        size = int(pending.get("size", int(size_field or b"0", 8)))
        kind = raw[156:157]
        offset = at + block
        if offset + size > total:
            return None
        at = offset + (size + block - 1) // block * block
        if kind == b"x":
            records = _pax_records(bytes(view[offset : offset + size]))
            if records is None or set(records) - _PAX_KEYS:
                return None
            pending = records
            continue
        if kind not in _FILE_TYPES + _OTHER_TYPES:
            return None
        name = raw[0:100].split(b"\0", 1)[0].decode("utf-8", "replace")
        prefix = raw[345:500].split(b"\0", 1)[0] if raw[257:263] == b"ustar\0" else b""
        if prefix:
            name = f"{prefix.decode('utf-8', 'replace')}/{name}"
        name = pending.get("path", name)
        pending = {}
        if kind in _FILE_TYPES:
            _add_member(samples, name, offset, size)
    return None  # no end-of-archive block


def _scan_tar(path: str) -> _Members:
    """[(key, {suffix: (data offset, size)})] of a shard in file order; reads headers only.

    ShardError naming the file when it is not a complete tar: tarfile stops without an error at a
    header that is cut off or damaged, so the archive must also end with its end-of-archive block.
    """
    stat = os.stat(path)
    cache_key = (os.path.realpath(path), stat.st_size, stat.st_mtime_ns)
    if cache_key in _scanned:
        return _scanned[cache_key]
    if stat.st_size:
        # Mapped, not read: only the pages of the headers are touched, not the frames between them.
        with (
            open(path, "rb") as f,
            mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped,
            memoryview(mapped) as view,
        ):
            fast = _scan_headers(view)
        if fast is not None:
            _scanned[cache_key] = fast
            return fast
    samples: _Members = []
    size, end = stat.st_size, 0
    try:
        with tarfile.open(path, "r:") as tar:
            for m in tar:
                blocks = (m.size + tarfile.BLOCKSIZE - 1) // tarfile.BLOCKSIZE  # data is padded to whole blocks
                end = m.offset_data + blocks * tarfile.BLOCKSIZE
                if (stop := m.offset_data + m.size) > size:
                    raise ShardError(f"{path}: truncated: member {m.name!r} ends at byte {stop} of {size}")
                if m.isfile():
                    _add_member(samples, m.name, m.offset_data, m.size)
    except tarfile.TarError as exc:
        raise ShardError(f"{path}: not a readable tar file ({exc}); truncated or damaged?") from None
    with open(path, "rb") as f:
        f.seek(end)
        block = f.read(tarfile.BLOCKSIZE)
    if len(block) < tarfile.BLOCKSIZE or block.count(0) != tarfile.BLOCKSIZE:
        raise ShardError(
            f"{path}: truncated or damaged after {len(samples)} samples (byte {end} of {size} is not the "
            "end-of-archive block)"
        )
    _scanned[cache_key] = samples
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
        self.question_types: list[str] = []  # the samples' question types, when the writer recorded them
        if os.path.exists(index_path):
            try:
                with open(index_path) as f:
                    index = json.load(f)
                shards = [(s["name"], int(s["num_samples"])) for s in index["shards"]]
                self.question_types = [str(t) for t in index.get("question_types", [])]
            except (ValueError, KeyError, TypeError) as exc:
                raise ShardError(f"{index_path}: not a shard index ({type(exc).__name__}: {exc})") from None
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
                raise FileNotFoundError(f"{shard_path}: missing (listed in {index_path})")
            members = _scan_tar(shard_path)
            if expected >= 0 and len(members) != expected:
                raise ShardError(f"{shard_path}: holds {len(members)} samples but {index_path} says {expected}")
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

    def where(self, i: int) -> str:
        """``shard file:key`` of sample ``i``, as its messages start."""
        shard, key, _ = self._entries[i]
        return f"{os.path.join(self.path, self.shard_names[shard])}:{key}"

    def __getitem__(self, i: int) -> dict:
        if not -len(self) <= i < len(self):
            raise IndexError(f"sample index {i} out of range for {len(self)} samples in {self.path!r}")
        shard, key, members = self._entries[i]
        where = self.where(i)
        if "json" not in members:
            raise ShardError(f"{where}: no {key}.json member")
        try:
            meta = json.loads(self._read(shard, *members["json"]))
        except ValueError as exc:
            raise ShardError(f"{where}: {key}.json is not valid JSON ({exc})") from None
        if not isinstance(meta, dict):
            raise ShardError(f"{where}: {key}.json is not an object")
        question, answer = sample_text_fields(meta, where)
        crc = meta.get("crc32", {})  # absent in shards written by other tools: nothing to verify
        if TEXT_CRC in crc and crc[TEXT_CRC] != text_crc32(question, answer):
            raise ShardError(f"{where}: {key}.json: the question/answer do not match their CRC-32")
        frame_members = sorted((int(m.group(1)), suffix) for suffix in members if (m := _FRAME_RE.match(suffix)))
        num_frames = int(meta.get("num_frames", len(frame_members)))
        if [j for j, _ in frame_members] != list(range(num_frames)):
            raise ShardError(
                f"{where}: expected frames 000..{num_frames - 1:03d}, found {[s for _, s in frame_members]}"
            )
        frames = [
            self._frame(where, suffix, self._read(shard, *members[suffix]), crc.get(suffix))
            for _, suffix in frame_members
        ]
        if len({f.shape for f in frames}) != 1:
            raise ShardError(f"{where}: frames differ in size {sorted({f.shape for f in frames})}")
        sample = {"frames": np.stack(frames), "question": question, "answer": answer}
        if "qtype" in meta:
            sample["qtype"] = str(meta["qtype"])
        return sample

    @staticmethod
    def _frame(where: str, suffix: str, data: bytes, crc: int | None) -> np.ndarray:
        """One stored frame as uint8 [H, W, 3]; ShardError naming the member if it is damaged or undecodable."""
        if crc is not None and zlib.crc32(data) != crc:
            raise ShardError(f"{where}: frame {suffix}: damaged ({len(data)} bytes do not match their CRC-32)")
        try:
            with Image.open(io.BytesIO(data)) as im:
                return np.asarray(im.convert("RGB"), dtype=np.uint8)
        except Exception as exc:  # decoders of untrusted bytes raise many types (OSError, SyntaxError, zlib.error)
            raise ShardError(f"{where}: frame {suffix}: cannot be decoded ({type(exc).__name__}: {exc})") from None

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_files"] = {}  # open files do not pickle
        return state

    def close(self) -> None:
        """Close the open shard files."""
        for f in self._files.values():
            f.close()
        self._files = {}
