"""Datasets and per-iteration micro-batches of a run.

Sample order is a pure function of (seed, iteration) (``lvx_megatron.data.sampler``), so a resumed
run reads exactly the batches the uninterrupted run would have read, with no loader state to save.
Every rank of a data-parallel replica (its TP, CP and PP ranks) reads the same micro-batches.
"""

import json
import os
import shutil
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch
import torch.distributed as dist

from ..data.batch import collate, encode_sample
from ..data.sampler import micro_batches
from ..data.shards import INDEX_FILE, ShardedVideoDataset, ShardError, write_shards
from ..data.tokenizer import Tokenizer, build_tokenizer
from ..data.video import SPLIT_FILES, VideoJsonlDataset
from ..data.video_qa import GENERATOR_VERSION, VideoQAGenerator, chance_accuracy, chance_by_type
from .config import ConfigError, RunConfig

SPLITS = ("train", "eval")
SETTINGS = "settings.json"  # what a generated copy was made with


def _synthetic_settings(cfg: RunConfig) -> dict:
    d = cfg.data
    return {
        "generator_version": GENERATOR_VERSION,
        "train_samples": d.train_samples,
        "eval_samples": d.eval_samples,
        "num_frames": d.max_images,
        "frame_size": d.frame_size,
        "seed": d.seed,
    }


def _split_problem(path: Path, num_samples: int) -> str | None:
    """Why the generated split in ``path`` is unusable (None: it is complete)."""
    if not (path / INDEX_FILE).is_file():  # write_shards writes it last
        return f"no {INDEX_FILE}: its generation did not finish"
    try:
        found = len(ShardedVideoDataset(str(path)))
    except (ShardError, OSError) as exc:
        return str(exc)
    return None if found == num_samples else f"{found} clips instead of {num_samples}"


def ensure_synthetic(cfg: RunConfig) -> None:
    """Make ``data.path`` hold the generated video QA splits of ``cfg``'s settings (one process only).

    ``settings.json`` says what the splits were made with. It is removed before anything is
    regenerated and written last, atomically, so after an interruption at any point it never
    vouches for splits that were not all made with it; a split that is incomplete or damaged
    anyway is regenerated, saying why.
    """
    d, root = cfg.data, Path(cfg.data.path)
    settings, wanted = root / SETTINGS, _synthetic_settings(cfg)
    try:
        current = json.loads(settings.read_text()) == wanted
    except (OSError, ValueError):  # missing, or half-written by an older version
        current = False
    stale = f"made with other data settings ({SETTINGS})"
    if not current and settings.exists():
        settings.unlink()
    elif not current:
        stale = f"no {SETTINGS}: an earlier generation did not finish"
    counts = {"train": d.train_samples, "eval": d.eval_samples}
    for split in SPLITS:
        path = root / split
        if current:
            problem = _split_problem(path, counts[split])
            if problem is None:
                continue
        else:
            problem = stale if path.exists() else None
        action = f"regenerating ({problem})" if problem else "generating"
        print(f"{action} the synthetic video QA {split} split ({counts[split]} clips) in {path}", flush=True)
        shutil.rmtree(path, ignore_errors=True)
        gen = VideoQAGenerator(counts[split], d.max_images, d.frame_size, seed=d.seed, split=split)
        write_shards(gen, str(path), samples_per_shard=1024, log_every=1024)
    if not current:
        tmp = root / f"{SETTINGS}.tmp"
        tmp.write_text(json.dumps(wanted, indent=1))
        os.replace(tmp, settings)


def chance_levels(cfg: RunConfig) -> dict[str, float]:
    """``chance`` and ``chance/<type>``: the held-out accuracy without looking at the frames, for
    the generated data (whose answer distribution is known); empty for other data."""
    if cfg.data.kind != "synthetic_video_qa":
        return {}
    return {"chance": chance_accuracy(), **{f"chance/{t}": c for t, c in chance_by_type().items()}}


def prepare_datasets(cfg: RunConfig) -> dict[str, ShardedVideoDataset | VideoJsonlDataset]:
    """The train and eval datasets; the synthetic one is generated (by global rank 0) when missing or stale.

    DataError naming the file when a shard folder or JSONL file cannot be read.
    """
    d = cfg.data
    root = Path(d.path)
    if d.kind == "video_jsonl":
        for split, name in SPLIT_FILES.items():
            if not (root / name).is_file():
                raise ConfigError(
                    f"config error: data.path: {root} holds no {name} (the {split} split: one JSON line per clip); "
                    "make an example with tools/make_video_clips.py"
                )
        fps = d.fps if d.frame_sampling == "fps" else None
        try:
            datasets = {split: VideoJsonlDataset(str(root), split, d.max_images, fps) for split in SPLITS}
        except OSError as exc:
            raise DataError(f"{exc.filename}: {exc.strerror}") from None
        for ds in datasets.values():
            if not len(ds):
                raise ConfigError(f"config error: data.path: {ds.jsonl} holds no samples (no non-blank lines)")
        return datasets
    if d.kind == "synthetic_video_qa":
        if dist.get_rank() == 0:
            ensure_synthetic(cfg)
        dist.barrier()
    for split in SPLITS:
        if not (root / split / INDEX_FILE).is_file():
            raise ConfigError(
                f"config error: data.path: {root / split} holds no shards ({INDEX_FILE}); make them with "
                "tools/folder_to_wds.py or tools/make_video_qa.py"
            )
    try:
        return {split: ShardedVideoDataset(str(root / split)) for split in SPLITS}
    except (ShardError, OSError) as exc:
        raise DataError(str(exc)) from None


def make_tokenizer(cfg: RunConfig) -> Tokenizer:
    """The run's tokenizer; ConfigError naming ``data.tokenizer_path`` when it cannot be loaded."""
    try:
        return build_tokenizer(cfg.data.tokenizer, cfg.data.tokenizer_path)
    except (ValueError, OSError) as exc:
        message = " ".join(str(exc).split())  # transformers' messages span several lines
        raise ConfigError(f"config error: data.tokenizer_path: {message}") from None


class DataError(RuntimeError):
    """Too many unreadable or invalid samples; the message names the threshold and the last one."""


class BatchSource:
    """This data-parallel replica's micro-batches of a dataset, iteration by iteration.

    Reading and tiling the frames of iteration ``i + 1`` runs in a background thread while
    iteration ``i`` trains (image and video decoding release the GIL), so the accelerator does not wait
    for it. A sample that cannot be read (broken image bytes, a missing, undecodable or too short clip,
    missing fields) or cannot be used (empty text,
    more frames than ``data.max_images``, text longer than ``data.seq_length``) is replaced by the
    next good one, deterministically, and counted; more than ``data.max_bad_samples`` aborts the run.
    """

    def __init__(
        self,
        cfg: RunConfig,
        dataset,
        tokenizer: Tokenizer,
        dp_rank: int,
        dp_size: int,
        seed: int,
        verbose: bool = False,
    ) -> None:
        self.cfg, self.dataset, self.tokenizer = cfg, dataset, tokenizer
        self.dp_rank, self.dp_size, self.seed = dp_rank, dp_size, seed
        self.verbose = verbose
        self.bad_samples = 0
        self.question_types: list[str] = list(getattr(dataset, "question_types", []))
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lvx-data")
        self._pending: dict[int, Future] = {}

    def _problem(self, index: int) -> tuple[dict | None, str]:
        """``(sample, "")`` if usable, else ``(None, reason)``."""
        d = self.cfg.data
        try:
            sample = self.dataset[index]
            frames, question, answer = sample["frames"], sample["question"], sample["answer"]
            if not question.strip() or not answer.strip():
                return None, "empty question or answer"
            if not 1 <= len(frames) <= d.max_images:
                return None, f"{len(frames)} frames (data.max_images = {d.max_images})"
            tokens, _ = encode_sample(question, answer, len(frames), self.tokenizer)
        except (ValueError, OSError, KeyError, TypeError) as exc:  # PIL's decode errors are OSErrors
            return None, f"{type(exc).__name__}: {exc}"
        if len(tokens) > d.seq_length:
            return None, f"{len(tokens)} tokens (data.seq_length = {d.seq_length})"
        return sample, ""

    def _sample(self, index: int) -> dict:
        """Sample ``index``, or the next usable one after it."""
        for offset in range(len(self.dataset)):
            candidate = (index + offset) % len(self.dataset)
            sample, reason = self._problem(candidate)
            if sample is not None:
                return sample
            self.bad_samples += 1
            if self.verbose:
                print(f"skipping bad sample {candidate}: {reason} ({self.bad_samples} so far)", flush=True)
            if self.bad_samples > self.cfg.data.max_bad_samples:
                raise DataError(
                    f"{self.bad_samples} unreadable or invalid samples (more than data.max_bad_samples = "
                    f"{self.cfg.data.max_bad_samples}); the last: sample {candidate} of {self.cfg.data.path}: {reason}"
                )
        raise DataError(f"no usable sample in {self.cfg.data.path}")

    def _load(self, iteration: int, pin: bool) -> list[dict[str, torch.Tensor]]:
        tr, d, v = self.cfg.training, self.cfg.data, self.cfg.model.vision
        try:
            index_lists = micro_batches(
                iteration,
                tr.global_batch_size,
                tr.micro_batch_size,
                self.dp_rank,
                self.dp_size,
                len(self.dataset),
                self.seed,
            )
        except ValueError as exc:
            raise ConfigError(f"config error: training: {exc}") from None
        batches = [
            collate(
                [self._sample(i) for i in indices],
                self.tokenizer,
                d.seq_length,
                d.max_images,
                v.max_num_tiles,
                v.image_size,
                self.question_types,
            )
            for indices in index_lists
        ]
        # Page-locked, the copies to the GPU run asynchronously and several times faster (the 1B
        # config's 77 MB of pixels per sample took ~12 ms from pageable memory on an H200).
        return [{k: t.pin_memory() for k, t in b.items()} for b in batches] if pin else batches

    def micro_batches(self, iteration: int, device: torch.device, prefetch_next: bool = True) -> list[dict]:
        """The micro-batches of ``iteration`` on ``device``; starts reading the next iteration's."""
        # Every read runs on the one worker thread: the dataset's file handles are not shared.
        pin = device.type == "cuda"
        pending = self._pending.pop(iteration, None) or self._pool.submit(self._load, iteration, pin)
        batches = pending.result()
        self._pending.clear()
        if prefetch_next:
            self._pending[iteration + 1] = self._pool.submit(self._load, iteration + 1, pin)
        return [{k: t.to(device, non_blocking=True) for k, t in b.items()} for b in batches]

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
