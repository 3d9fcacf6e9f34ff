"""Video QA clips as a megatron-energon dataset: written from a clips + JSONL folder, read by energon's loaders.

The dataset is a WebDataset prepared by ``energon prepare`` as a ``CrudeWebdataset``: sample ``KEY``
is ``KEY.json`` (``question``, ``answer``, optional ``start``/``end``/``fps``/``qtype`` as in a
``video_jsonl`` line, and ``source``: the JSONL line and clip it came from) and the clip's bytes as
they were (``KEY.mp4``, ``.webm`` or ``.mkv``). :class:`ClipTaskEncoder` cooks a sample in energon's
worker processes: it decodes the clip with :func:`~lvx_megatron.data.video.decode_clip`, and a sample
that cannot be made arrives as a :class:`ClipSample` with ``problem`` set, never as an exception, so
the reader counts and replaces it. See docs/data.md ("Energon datasets").
"""

from __future__ import annotations

import bisect
import json
import os
import sys
import tarfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import webdataset as wds
from megatron.energon import (
    Cooker,
    DefaultTaskEncoder,
    Sample,
    SourceInfo,
    WorkerConfig,
    edataclass,
    get_loader,
    get_savable_loader,
    get_train_dataset,
    get_val_dataset,
    load_dataset,
    stateless,
)
from megatron.energon.flavors.webdataset.itar import get_itar_byte_offset
from megatron.energon.flavors.webdataset.sample_loader import RawSampleData, WebdatasetSampleLoaderDataset
from megatron.energon.tools.prepare import command as energon_prepare

from lvx_megatron.data.checks import located
from lvx_megatron.data.ownership import claim_output
from lvx_megatron.data.video import (
    CLIP_EXTENSIONS,
    SPLIT_FILES,
    VideoError,
    clip_fields,
    clip_path,
    decode_clip,
    parse_clip_line,
)

# Energon's loaders always ask torch for pinned memory; without an accelerator torch warns on every iterator.
warnings.filterwarnings(
    "ignore", message="'pin_memory' argument is set as true but no accelerator", category=UserWarning
)

SPLIT_PARTS: dict[str, str] = {"train": "train", "eval": "val"}  # our split -> energon's split part (and folder)
QUESTION_TYPES = "question_types.json"  # beside .nv-meta/: the samples' "qtype" values, for per-type accuracy
CLIP_PARTS: tuple[str, ...] = tuple(ext.lstrip(".") for ext in CLIP_EXTENSIONS)
CONVERTER = "tools/video_jsonl_to_energon.py"  # the owner named by the marker of the folders it writes
READ_ERROR = "lvx_read_error"  # the part of a sample whose tar members could not be read: why


@edataclass
class ClipSample(Sample):
    """A cooked sample: ``frames`` uint8 [F, H, W, 3] and the text, or ``problem`` (why it cannot be used).
    ``name`` is ``TAR:KEY``, the tar file it is in and its key (unique across the datasets of a blend);
    ``where`` starts its messages (``sample KEY (train.jsonl:LINE clip)``: the line it was converted from)."""

    name: str
    where: str
    frames: np.ndarray | None
    question: str
    answer: str
    qtype: str | None
    problem: str


@dataclass(frozen=True)
class ClipSettings:
    """How clips become frames (``data.max_images``, and ``data.fps`` with ``frame_sampling: fps``)."""

    num_frames: int
    fps: float | None = None


def cook_clip(raw: dict, settings: ClipSettings) -> ClipSample:
    """Decode one crude sample (``{"__key__", "json": bytes, "mp4"|"webm"|"mkv": bytes, ...}``) into a
    :class:`ClipSample`; a sample that cannot be made (or read: ``READ_ERROR``) gets ``problem`` naming its
    key and source."""
    key = raw["__key__"]
    where, fields = f"sample {key}", None
    if READ_ERROR in raw:
        return _bad_clip(raw, where, raw[READ_ERROR])
    try:
        meta = json.loads(raw["json"]) if "json" in raw else None
        if not isinstance(meta, dict):
            raise ValueError(f"{where}: no .json object")
        if isinstance(meta.get("source"), str):
            where = f"{where} ({meta['source']})"
        fields = clip_fields(meta, where)
        parts = [p for p in CLIP_PARTS if p in raw]
        if not parts:
            raise VideoError(f"{where}: no clip ({'/'.join(CLIP_PARTS)} member)")
        fps = fields["fps"] if fields["fps"] is not None else settings.fps
        frames = decode_clip(
            f"{key}.{parts[0]}", settings.num_frames, fields["start"], fields["end"], fps, data=raw[parts[0]]
        )
    except (ValueError, KeyError, TypeError) as exc:  # VideoError is a ValueError; a bad window too
        return _bad_clip(raw, where, f"{type(exc).__name__}: {located(where, str(exc))}")
    return ClipSample(
        **_sample_keys(raw),
        name=sample_name(raw),
        where=where,
        frames=frames,
        question=fields["question"],
        answer=fields["answer"],
        qtype=fields["qtype"],
        problem="",
    )


def _bad_clip(raw: dict, where: str, problem: str) -> ClipSample:
    return ClipSample(
        **_sample_keys(raw),
        name=sample_name(raw),
        where=where,
        frames=None,
        question="",
        answer="",
        qtype=None,
        problem=problem,
    )


def sample_name(raw: dict) -> str:
    """``TAR:KEY`` of a crude sample (its key alone when energon gave no source)."""
    sources = raw.get("__sources__") or ()
    where = f"{sources[0].dataset_path / sources[0].shard_name}:" if sources else ""
    return f"{where}{raw['__key__']}"


def _sample_keys(raw: dict) -> dict:
    return {k: raw[k] for k in ("__key__", "__restore_key__", "__subflavors__", "__sources__") if k in raw}


def _unreadable_sample(reader, index: int, exc: Exception) -> dict:
    """A crude sample standing for sample ``index`` of ``reader`` (energon's tar reader), whose tar members
    could not be read: its ``READ_ERROR`` names the tar file, the sample's place in it and the error."""
    # ShardInfosITarReader (energon 7.4's reader of a webdataset) numbers the samples over its shards.
    shard_index = bisect.bisect_right(reader.shard_count_cumsum, index) - 1
    shard = reader.shard_infos[shard_index]
    place = index - reader.shard_count_cumsum[shard_index]
    source = SourceInfo(dataset_path=reader.base_path, index=index, shard_name=shard.name, file_names=())
    problem = f"ShardError: {shard.path}: sample {place} of it cannot be read ({type(exc).__name__}: {exc})"
    return {
        "__key__": f"#{place}",
        "__restore_key__": ("Webdataset", index),
        "__sources__": (source,),
        READ_ERROR: problem,
    }


def _get_sample_or_unreadable(self: WebdatasetSampleLoaderDataset, index: int) -> RawSampleData:
    try:
        return _read_sample(self, index)
    except (OSError, tarfile.TarError, ValueError) as exc:  # energon's own "Unexpected end of tar file" too
        data = tuple(_unreadable_sample(reader, index, exc) for reader in self.join_readers)
        return RawSampleData(__restore_key__=("Webdataset", index), data=data)


# Energon reads a sample's tar members outside its error handling (in its sample loader, before any cooker),
# so one damaged tar header or a tar cut off or deleted during a run would end the loader with a traceback.
# Read through this instead, a sample that cannot be read arrives as a bad sample naming its tar: it is
# skipped and counted like an undecodable clip.
_read_sample = WebdatasetSampleLoaderDataset._get_sample
WebdatasetSampleLoaderDataset._get_sample = _get_sample_or_unreadable


def shard_problem(path: str, split: str, config: WorkerConfig) -> str | None:
    """The first tar file of ``split`` in ``path`` (a prepared folder or a metadataset YAML) that is missing or
    shorter than its index says (``.tar.idx``: where its last sample ends), as ``TAR: what``; None if none.
    The damage is to the whole file, so it is found before reading (damage inside a sample is found when
    it is read, and skipped as a bad sample)."""
    datasets = load_dataset(path).get_datasets(
        training=split == "train", split_part=SPLIT_PARTS[split], worker_config=config
    )
    for loaded in datasets.datasets:
        for shard in getattr(loaded.dataset, "shards", ()):
            if not shard.path.is_file():
                return f"{shard.path}: missing (listed in the dataset's .nv-meta/); restore it or prepare it again"
            try:
                end = get_itar_byte_offset(shard.path, shard.count)
            except (OSError, IndexError) as exc:
                problem = f"{type(exc).__name__}: {exc}"
                return f"{shard.path}: its index {shard.path}.idx cannot be read ({problem}); prepare the dataset again"
            if (size := shard.path.size()) < end:
                return (
                    f"{shard.path}: truncated: {size} bytes, but its {shard.count} samples end at byte {end} "
                    f"(its index {shard.path}.idx)"
                )
    return None


class ClipTaskEncoder(DefaultTaskEncoder):
    """Energon task encoder: raw tar members in (no energon decoding), :class:`ClipSample` out, unbatched
    (``batch`` hands a list on: the trainer collates, after replacing bad samples)."""

    decoder = None  # the clip bytes reach cook_clip as they are stored

    def __init__(self, settings: ClipSettings) -> None:
        super().__init__()
        self.settings = settings
        self.cookers = [Cooker(self._cook)]

    @stateless
    def _cook(self, raw: dict) -> ClipSample:
        return cook_clip(raw, self.settings)

    @stateless
    def batch(self, samples: list[ClipSample]) -> list[ClipSample]:
        return list(samples)


def worker_config(dp_rank: int, dp_size: int, num_workers: int, seed: int) -> WorkerConfig:
    """Energon's per-rank sharding: over the data-parallel ranks only, so every TP/CP/PP rank of a replica
    (same ``dp_rank``) reads the same samples."""
    return WorkerConfig(rank=dp_rank, world_size=dp_size, num_workers=num_workers, seed_offset=seed)


def train_loader(
    path: str,
    settings: ClipSettings,
    config: WorkerConfig,
    shuffle_buffer_size: int,
    max_samples_per_sequence: int,
):
    """A savable loader over the train split of ``path`` (a dataset folder or a metadataset YAML with
    blend weights), yielding one :class:`ClipSample` at a time, looping forever."""
    dataset = get_train_dataset(
        path,
        split_part=SPLIT_PARTS["train"],
        worker_config=config,
        batch_size=None,
        shuffle_buffer_size=shuffle_buffer_size,
        max_samples_per_sequence=max_samples_per_sequence,
        task_encoder=ClipTaskEncoder(settings),
    )
    return get_savable_loader(dataset, watchdog_timeout_seconds=None)


def eval_loader(path: str, settings: ClipSettings, config: WorkerConfig):
    """A loader over the eval split (energon's ``val``) of ``path``, in order, once per iteration over it;
    each item is a list of one :class:`ClipSample`."""
    dataset = get_val_dataset(
        path, split_part=SPLIT_PARTS["eval"], worker_config=config, batch_size=1, task_encoder=ClipTaskEncoder(settings)
    )
    return get_loader(dataset, watchdog_timeout_seconds=None)


def prepare_command(out: str) -> list[str]:
    """The ``energon prepare`` arguments that index ``out``'s ``train/`` and ``val/`` tars as a crude dataset."""
    return [
        out,
        "--non-interactive",
        "--force-overwrite",
        "--no-progress",
        "--num-workers",
        "1",
        "--split-parts",
        r"train:train/.*\.tar",
        "--split-parts",
        r"val:val/.*\.tar",
        "--sample-type",
        "CrudeWebdataset",
    ]


def write_energon_dataset(
    root: str, out: str, samples_per_shard: int = 1000, log_every: int = 1000, allow_outside_paths: bool = False
) -> dict:
    """Convert the clips + JSONL folder ``root`` (``train.jsonl``, ``eval.jsonl``: the ``video_jsonl`` layout)
    into an energon dataset in ``out``, then run ``energon prepare`` on it. Clip bytes are stored as they are.

    A line that cannot make a sample (invalid JSON, no question or answer, no clip, a clip that is not there
    or, unless ``allow_outside_paths``, outside ``root``) is skipped and named on stderr; clips are not decoded
    here (that is training's job, where an undecodable or too short clip is a counted bad sample). ``out`` is
    claimed first (a folder that another tool or the
    user wrote is a ValueError: an earlier conversion's shards are replaced only in a folder this one made).
    Returns ``{"train": {"samples", "skipped"}, "eval": ...}``.
    """
    claim_output(Path(out), CONVERTER)
    counts, types = {}, set()
    for split, part in SPLIT_PARTS.items():
        jsonl = os.path.join(root, SPLIT_FILES[split])
        if not os.path.isfile(jsonl):
            raise FileNotFoundError(f"{jsonl}: no such file (the {split} split: one JSON line per clip)")
        folder = os.path.join(out, part)
        os.makedirs(folder, exist_ok=True)
        for stale in os.listdir(folder):
            if stale.endswith((".tar", ".tar.idx")):  # an earlier conversion's shards and energon's indexes
                os.remove(os.path.join(folder, stale))
        written = skipped = 0
        with (
            open(jsonl, "rb") as f,
            wds.ShardWriter(os.path.join(folder, "shard-%06d.tar"), maxcount=samples_per_shard, verbose=0) as sink,
        ):
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                where = f"{jsonl}:{lineno}"
                try:
                    rec = parse_clip_line(line, where)
                    clip = clip_path(root, rec["video"], where, allow_outside_paths, "--allow-outside-paths")
                    if not os.path.isfile(clip):
                        raise VideoError(f"{where}: {clip}: clip not found")
                    with open(clip, "rb") as c:
                        data = c.read()
                except (ValueError, OSError) as exc:
                    skipped += 1
                    print(f"skipping {exc}", file=sys.stderr, flush=True)
                    continue
                meta = {k: v for k, v in rec.items() if k != "video" and v is not None}
                if rec["qtype"] is not None:
                    types.add(rec["qtype"])
                meta["source"] = f"{SPLIT_FILES[split]}:{lineno} {rec['video']}"
                ext = os.path.splitext(rec["video"])[1].lower().lstrip(".")
                sink.write({"__key__": f"{part}-{written:09d}", "json": json.dumps(meta).encode(), ext: data})
                written += 1
                if log_every and written % log_every == 0:
                    print(f"{split}: {written} samples written", file=sys.stderr, flush=True)
        if not written:
            raise ValueError(f"{jsonl}: no usable sample ({skipped} skipped)")
        counts[split] = {"samples": written, "skipped": skipped}
        print(f"{split}: {written} samples in {folder} ({skipped} lines skipped)", file=sys.stderr, flush=True)
    with open(os.path.join(out, QUESTION_TYPES), "w") as f:
        json.dump(sorted(types), f)
    args = prepare_command(out)
    print("energon prepare " + " ".join(f"'{a}'" if "*" in a else a for a in args), file=sys.stderr, flush=True)
    energon_prepare.main(args=args, standalone_mode=False)
    if not os.path.isfile(os.path.join(out, ".nv-meta", "dataset.yaml")):  # it reports its failures, not raises
        raise RuntimeError(f"energon prepare did not prepare {out} (its messages are above)")
    return counts


def question_types(path: str) -> list[str]:
    """The question types of the dataset folder ``path`` (its ``QUESTION_TYPES`` file, written by
    :func:`write_energon_dataset`); [] for a metadataset YAML or a dataset made by another tool."""
    try:
        with open(os.path.join(path, QUESTION_TYPES)) as f:
            return [str(t) for t in json.load(f)]
    except (OSError, ValueError):
        return []
