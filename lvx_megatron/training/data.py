"""Datasets and per-iteration micro-batches of a run.

For the map-style datasets, sample order is a pure function of (seed, iteration)
(``lvx_megatron.data.sampler``), so a resumed run reads exactly the batches the uninterrupted run would
have read, with no loader position to save (a checkpoint keeps only the bad samples found so far); an
energon dataset's loader position is saved in the checkpoint too (:class:`EnergonBatchSource`). Every
rank of a data-parallel replica (its TP, CP and PP ranks) reads the same micro-batches.
"""

import gc
import json
import os
import pickle
import shutil
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch
import torch.distributed as dist

from ..data.batch import collate, encode_sample
from ..data.checks import located
from ..data.ownership import claim, ownership_problem
from ..data.sampler import micro_batches
from ..data.shards import INDEX_FILE, ShardedVideoDataset, ShardError, write_shards
from ..data.tokenizer import Tokenizer, build_tokenizer
from ..data.video import SPLIT_FILES, VideoJsonlDataset
from ..data.video_qa import GENERATOR_VERSION, VideoQAGenerator, chance_accuracy, chance_by_type
from .config import ConfigError, RunConfig

SPLITS = ("train", "eval")
SETTINGS = "settings.json"  # what a generated copy was made with
GENERATOR = "synthetic_video_qa"  # the owner named by the marker of a folder ensure_synthetic generated


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


def _generated_before_markers(root: Path, cfg: RunConfig) -> bool:
    """Whether ``root`` holds a ``settings.json`` of the generator's: a folder it generated before it marked them."""
    try:
        settings = json.loads((root / SETTINGS).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(settings, dict) and settings.keys() == _synthetic_settings(cfg).keys()


def check_synthetic_folder(cfg: RunConfig) -> None:
    """ConfigError naming ``data.path`` and ``data.kind`` unless the generator may (re)generate its clips there:
    the folder is missing or empty, or the generator made it (its ownership marker)."""
    root = Path(cfg.data.path)
    problem = ownership_problem(root, GENERATOR, legacy=lambda folder: _generated_before_markers(folder, cfg))
    if problem is not None:
        raise ConfigError(
            f"config error: data.path: {problem}; data.kind {GENERATOR} (the default) generates and regenerates "
            "its own clips there: set data.kind (shards, video_jsonl or energon) to read this data, or data.path "
            "to a new or empty folder"
        )


def ensure_synthetic(cfg: RunConfig) -> None:
    """Make ``data.path`` hold the generated video QA splits of ``cfg``'s settings (one process only).

    Only a folder the generator owns is written (:func:`check_synthetic_folder`); it marks the folder
    before writing anything, and the mark stays. ``settings.json`` says what the splits were made
    with. It is removed before anything is regenerated and written last, atomically, so after an
    interruption at any point it never vouches for splits that were not all made with it; a split
    that is incomplete or damaged anyway is regenerated, saying why.
    """
    check_synthetic_folder(cfg)
    d, root = cfg.data, Path(cfg.data.path)
    claim(root, GENERATOR)
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
    """The train and eval datasets; the synthetic one is generated (by global rank 0) when missing or stale;
    none for ``kind: energon``, whose loaders :func:`make_sources` builds.

    DataError naming the file when a shard folder or JSONL file cannot be read.
    """
    d = cfg.data
    root = Path(d.path)
    if d.kind == "energon":  # read by energon's own loaders (make_sources); here only checked to exist
        if not (root.is_file() and root.suffix in (".yaml", ".yml")) and not (root / ".nv-meta").is_dir():
            raise ConfigError(
                f"config error: data.path: {root} is neither a prepared energon dataset (a folder with .nv-meta/) "
                "nor a metadataset YAML; make one with tools/video_jsonl_to_energon.py"
            )
        return {}
    if d.kind == "video_jsonl":
        for split, name in SPLIT_FILES.items():
            if not (root / name).is_file():
                raise ConfigError(
                    f"config error: data.path: {root} holds no {name} (the {split} split: one JSON line per clip); "
                    "make an example with tools/make_video_clips.py"
                )
        fps = d.fps if d.frame_sampling == "fps" else None
        try:
            datasets = {
                split: VideoJsonlDataset(str(root), split, d.max_images, fps, d.allow_outside_paths) for split in SPLITS
            }
        except OSError as exc:
            raise DataError(f"{exc.filename}: {exc.strerror}") from None
        for ds in datasets.values():
            if not len(ds):
                raise ConfigError(f"config error: data.path: {ds.jsonl} holds no samples (no non-blank lines)")
        return datasets
    if d.kind == "synthetic_video_qa":
        # Every rank checks, and all have checked before rank 0 writes: a refusal ends all of them, not
        # rank 0 alone, and no rank sees the folder half-claimed.
        check_synthetic_folder(cfg)
        dist.barrier()
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


def make_sources(
    cfg: RunConfig, datasets: dict, tokenizer: Tokenizer, dp_rank: int, dp_size: int, verbose: bool
) -> dict[str, "_Prefetcher"]:
    """The train and eval micro-batch sources of this data-parallel rank (``datasets``: :func:`prepare_datasets`)."""
    if cfg.data.kind == "energon":
        return {split: EnergonBatchSource(cfg, split, tokenizer, dp_rank, dp_size, verbose) for split in SPLITS}
    seeds = {"train": cfg.data.seed, "eval": cfg.data.seed + 1}
    return {
        split: BatchSource(cfg, datasets[split], tokenizer, dp_rank, dp_size, seeds[split], verbose) for split in SPLITS
    }


def unusable_reason(cfg: RunConfig, tokenizer: Tokenizer, sample: dict) -> str:
    """Why ``sample`` cannot be trained on or scored (empty text, too many frames or tokens); "" if it can."""
    d = cfg.data
    frames, question, answer = sample["frames"], sample["question"], sample["answer"]
    if not question.strip() or not answer.strip():
        return "empty question or answer"
    if not 1 <= len(frames) <= d.max_images:
        return f"{len(frames)} frames (data.max_images = {d.max_images})"
    tokens, _ = encode_sample(question, answer, len(frames), tokenizer)
    if len(tokens) > d.seq_length:
        return f"{len(tokens)} tokens (data.seq_length = {d.seq_length})"
    return ""


def collate_samples(
    cfg: RunConfig, tokenizer: Tokenizer, samples: list[dict], question_types: list[str]
) -> dict[str, torch.Tensor]:
    """The run's micro-batch of ``samples`` (the data and tile sizes of ``cfg``)."""
    d, v = cfg.data, cfg.model.vision
    return collate(samples, tokenizer, d.seq_length, d.max_images, v.max_num_tiles, v.image_size, question_types)


class DataError(RuntimeError):
    """Data that cannot be trained on; the message names the file (for bad samples: the limit and the last one)."""


class TooManyBadSamples(DataError):
    """More than ``data.max_bad_samples`` bad samples, found by the reads of all ranks (raised on every rank)."""


class _OverLimit(Exception):
    """This rank's reads alone found more than ``data.max_bad_samples`` bad samples: the read stops, and the
    next agreement (:meth:`_Prefetcher._agree`) stops every rank."""


class _Prefetcher:
    """This data-parallel replica's micro-batches, iteration by iteration, read one iteration ahead.

    Reading and tiling the frames of iteration ``i + 1`` runs in a background thread while
    iteration ``i`` trains (image and video decoding release the GIL), so the accelerator does not wait
    for it. Subclasses say how an iteration's samples are read (``_load``); a sample that cannot be read
    or used is skipped through :meth:`_skip`.

    Bad samples are counted once each, by key, over all ranks: the call of :meth:`micro_batches` for
    iteration ``i`` merges the keys the ranks' reads of iterations up to ``i`` found (one small all-reduce,
    and a gather of the new keys when there are any; never those of the read-ahead, so the count does not
    depend on timing), names the new ones on the log and raises :class:`TooManyBadSamples` on every rank
    past ``data.max_bad_samples``. The keys are saved in checkpoints (:meth:`data_state`), so a resumed
    run goes on counting.
    """

    def __init__(self, cfg: RunConfig, tokenizer: Tokenizer, question_types: list[str], verbose: bool) -> None:
        self.cfg, self.tokenizer, self.verbose = cfg, tokenizer, verbose
        self.question_types = question_types
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lvx-data")
        self._pending: dict[int, Future] = {}
        # The reading thread adds to _found, the training thread moves them to _bad; never in both.
        self._lock = threading.Lock()
        self._bad: set[str] = set()  # keys of the bad samples every rank knows of (the same on every rank)
        self._found: dict[str, tuple[int, str]] = {}  # key -> (iteration read, reason): this rank's, since
        self._reading = 0  # the iteration the reading thread reads
        self._last_bad = ""  # "KEY: reason" of the newest bad sample

    @property
    def bad_samples(self) -> int:
        """Distinct bad samples found by all ranks' reads (as of the last :meth:`micro_batches`)."""
        return len(self._bad)

    def _known_bad(self, key: str) -> bool:
        with self._lock:
            return key in self._bad or key in self._found

    def _skip(self, key: str, reason: str) -> None:
        """Record the bad sample ``key`` (reading thread); once per key. _OverLimit past ``data.max_bad_samples``."""
        with self._lock:
            if key in self._bad or key in self._found:
                return
            self._found[key] = (self._reading, reason)
            over = len(self._bad) + len(self._found) > self.cfg.data.max_bad_samples
        if over:
            raise _OverLimit

    def _agree(self, iteration: int, device: torch.device | str) -> None:
        """Merge the bad samples every rank's reads of iterations up to ``iteration`` found (collective);
        TooManyBadSamples on every rank past the limit."""
        with self._lock:
            mine = [(key, reason) for key, (read, reason) in self._found.items() if read <= iteration]
        found = mine
        if dist.is_initialized() and dist.get_world_size() > 1:
            count = torch.tensor([len(mine)], device=device)
            dist.all_reduce(count)
            found = []
            if count.item():
                per_rank: list = [None] * dist.get_world_size()
                dist.all_gather_object(per_rank, mine)
                found = [item for items in per_rank for item in items]
        new = []
        with self._lock:
            for key, reason in found:  # the ranks of one replica find the same ones
                if key not in self._bad:
                    self._bad.add(key)
                    new.append((key, reason))
                self._found.pop(key, None)
            total = len(self._bad)
        for n, (key, reason) in enumerate(new, start=total - len(new) + 1):
            self._last_bad = f"{key}: {reason}"
            if self.verbose:
                print(f"skipping bad sample {self._last_bad} ({n} so far)", flush=True)
        limit = self.cfg.data.max_bad_samples
        if total > limit:
            last = f"; the last: sample {self._last_bad}" if self._last_bad else ""
            raise TooManyBadSamples(
                f"{total} unreadable or invalid samples (more than data.max_bad_samples = {limit}) in "
                f"{self.cfg.data.path}{last}"
            )

    def _num_micro_batches(self, dp_size: int) -> int:
        tr = self.cfg.training
        if tr.global_batch_size % (tr.micro_batch_size * dp_size):
            raise ConfigError(
                f"config error: training: global_batch_size ({tr.global_batch_size}) must be divisible by "
                f"micro_batch_size * dp_size ({tr.micro_batch_size} * {dp_size})"
            )
        return tr.global_batch_size // (tr.micro_batch_size * dp_size)

    def _usable(self, sample: dict) -> str:
        return unusable_reason(self.cfg, self.tokenizer, sample)

    def _collate(self, samples: list[dict]) -> dict[str, torch.Tensor]:
        return collate_samples(self.cfg, self.tokenizer, samples, self.question_types)

    def _load(self, iteration: int) -> list[dict[str, torch.Tensor]]:
        raise NotImplementedError

    def _read(self, iteration: int, pin: bool) -> list[dict[str, torch.Tensor]]:
        self._reading = iteration
        batches = self._load(iteration)
        # Page-locked, the copies to the GPU run asynchronously and several times faster (the 1B
        # config's 77 MB of pixels per sample took ~12 ms from pageable memory on an H200).
        return [{k: t.pin_memory() for k, t in b.items()} for b in batches] if pin else batches

    def micro_batches(self, iteration: int, device: torch.device | str, prefetch_next: bool = True) -> list[dict]:
        """The micro-batches of ``iteration`` on ``device``; starts reading the next iteration's. Collective
        (the ranks agree on the bad samples): every rank calls it for the same iterations."""
        # Every read runs on the one worker thread: the dataset's file handles are not shared.
        pin = torch.device(device).type == "cuda"
        pending = self._pending.pop(iteration, None) or self._pool.submit(self._read, iteration, pin)
        self._pending.clear()
        try:
            batches = pending.result()
        except _OverLimit:  # then this rank's keys alone are past the limit: _agree raises
            batches = []
        else:
            if prefetch_next:
                self._pending[iteration + 1] = self._pool.submit(self._read, iteration + 1, pin)
        self._agree(iteration, device)
        return [{k: t.to(device, non_blocking=True) for k, t in b.items()} for b in batches]

    def data_state(self, iteration: int) -> dict | None:
        """What a checkpoint of ``iteration`` must hold to resume reading there (collective; the same on every
        rank): the bad samples found so far (the samples of an iteration follow from its number)."""
        d = self.cfg.data
        return {"bad_samples": {"kind": d.kind, "path": d.path, "keys": sorted(self._bad), "last": self._last_bad}}

    def restore(self, saved: dict | None) -> None:
        """Continue from a checkpoint's :meth:`data_state` (before the first read): its bad samples count on,
        when it read the same data (``data.kind`` and ``data.path``)."""
        bad, d = (saved or {}).get("bad_samples"), self.cfg.data
        if bad is not None and (bad["kind"], bad["path"]) == (d.kind, d.path):
            self._bad, self._last_bad = set(bad["keys"]), bad["last"]

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


class BatchSource(_Prefetcher):
    """Micro-batches of a map-style dataset (shards, clips + JSONL), sample indices from the stateless sampler.

    A sample that cannot be read (broken image bytes, a missing, undecodable or too short clip,
    missing fields) or cannot be used (empty text, more frames than ``data.max_images``, text longer
    than ``data.seq_length``) is replaced by the next good one, deterministically, and counted.
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
        super().__init__(cfg, tokenizer, list(getattr(dataset, "question_types", [])), verbose)
        self.dataset = dataset
        self.dp_rank, self.dp_size, self.seed = dp_rank, dp_size, seed

    def _problem(self, index: int) -> tuple[dict | None, str]:
        """``(sample, "")`` if usable, else ``(None, reason)``; the reason starts with the sample's file and
        line (or key)."""
        where = self.dataset.where(index)
        try:
            sample = self.dataset[index]
            reason = self._usable(sample)
        except (ValueError, OSError, KeyError, TypeError) as exc:  # PIL's decode errors are OSErrors
            return None, f"{type(exc).__name__}: {located(where, str(exc))}"
        return (None, located(where, reason)) if reason else (sample, "")

    def _sample(self, index: int) -> dict:
        """Sample ``index``, or the next usable one after it."""
        for offset in range(len(self.dataset)):
            candidate = (index + offset) % len(self.dataset)
            if self._known_bad(str(candidate)):  # not read (and counted) again
                continue
            sample, reason = self._problem(candidate)
            if sample is not None:
                return sample
            self._skip(str(candidate), reason)
        raise DataError(f"no usable sample in {self.cfg.data.path}")

    def _load(self, iteration: int) -> list[dict[str, torch.Tensor]]:
        tr = self.cfg.training
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
        return [self._collate([self._sample(i) for i in indices]) for indices in index_lists]


class EnergonBatchSource(_Prefetcher):
    """Micro-batches of an energon dataset's split (``data.kind: energon``), read with energon's loaders.

    Energon shards the samples over the data-parallel ranks; its workers decode the clips. A tar file
    that is missing or cut short is a DataError naming it, before any read. A bad sample
    (``ClipSample.problem``: an undecodable or too short clip, no clip, no answer, tar members that
    cannot be read) or an unusable one is counted and replaced by the next sample the loader yields.
    The train split's loader state after every iteration's reads is kept, so :meth:`data_state` can save
    it for an exact resume; the eval split is read from its start at every evaluation (iteration 0).
    """

    def __init__(self, cfg: RunConfig, split: str, tokenizer: Tokenizer, dp_rank: int, dp_size: int, verbose: bool):
        from ..data import energon  # imports megatron-energon: only for this kind

        d = cfg.data
        super().__init__(cfg, tokenizer, energon.question_types(d.path), verbose)
        self.split, self.dp_rank, self.dp_size = split, dp_rank, dp_size
        self._num_micro = self._num_micro_batches(dp_size)
        settings = energon.ClipSettings(d.max_images, d.fps if d.frame_sampling == "fps" else None)
        config = energon.worker_config(dp_rank, dp_size, d.num_workers, d.seed if split == "train" else d.seed + 1)
        try:
            if split == "train":
                self.loader = energon.train_loader(
                    d.path, settings, config, d.shuffle_buffer_size, d.max_samples_per_sequence
                )
            else:
                self.loader = energon.eval_loader(d.path, settings, config)
        except Exception as exc:  # energon raises plain Exceptions/AssertionErrors for unusable datasets
            raise ConfigError(
                f"config error: data.path: {d.path}: not a usable energon dataset for the {split} split "
                f"(energon split part {energon.SPLIT_PARTS[split]!r}): {type(exc).__name__}: {exc}"
            ) from None
        if problem := energon.shard_problem(d.path, split, config):
            raise DataError(problem)
        self._iterator = None
        # The loader state before the reads of iteration i, for each i read so far (the last two kept):
        # the training thread asks for iteration i's while iteration i's reads may already be under way.
        self._states: dict[int, object] = {}
        self._initial = None  # the state restored from a checkpoint (None: the dataset's start)

    def _next(self):
        if self._iterator is None:
            self._iterator = iter(self.loader)
        try:
            item = next(self._iterator)
        except StopIteration:  # the eval split is finite: read it again from its start
            self._iterator = iter(self.loader)
            item = next(self._iterator)
        return item[0] if isinstance(item, list) else item

    def _good_sample(self) -> dict:
        while True:  # _skip raises past data.max_bad_samples
            clip = self._next()
            if clip.problem:
                self._skip(clip.name, clip.problem)
                continue
            sample = {"frames": clip.frames, "question": clip.question, "answer": clip.answer}
            if clip.qtype is not None:
                sample["qtype"] = clip.qtype
            if reason := self._usable(sample):
                self._skip(clip.name, located(clip.where, reason))
                continue
            return sample

    def _load(self, iteration: int) -> list[dict[str, torch.Tensor]]:
        if self.split == "eval" and iteration == 0:
            self._iterator = None  # every evaluation scores the same samples
        batches = [
            self._collate([self._good_sample() for _ in range(self.cfg.training.micro_batch_size)])
            for _ in range(self._num_micro)
        ]
        if self.split == "train":
            self._states[iteration + 1] = self.loader.save_state_rank()
            self._states.pop(iteration - 1, None)
        return batches

    def _state_at(self, iteration: int):
        if iteration in self._states:
            return self._states[iteration]
        if not self._states:  # nothing read since the start or the restore
            return self._initial
        raise RuntimeError(f"no loader state recorded for iteration {iteration} (have {sorted(self._states)})")

    def data_state(self, iteration: int) -> dict | None:
        """``{"kind": "energon", "dp_size", "states": [pickled loader state of DP rank r, ...], "bad_samples"}``,
        the same dict on every rank (gathered over all of them; the ranks of one replica read the same samples)."""
        if self.split != "train":
            return None
        gathered: list = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, (self.dp_rank, pickle.dumps(self._state_at(iteration))))
        by_rank = {}
        for rank, state in gathered:
            by_rank.setdefault(rank, state)
        return {
            "kind": "energon",
            "dp_size": self.dp_size,
            "num_workers": self.cfg.data.num_workers,
            "states": [by_rank[r] for r in range(self.dp_size)],
            **super().data_state(iteration),
        }

    def close(self) -> None:
        """Stop the reads and energon's worker processes (they end with the loader's iterator)."""
        super().close()
        self._iterator = None
        self.loader = None
        gc.collect()  # the iterator sits in reference cycles; its workers are shut down when it is freed

    def restore(self, saved: dict | None) -> None:
        """Continue where the checkpoint's loader stopped. ConfigError when it was saved with another
        data-parallel size or ``data.num_workers`` (energon's state is per rank and worker); a checkpoint
        without energon state (another ``data.kind``) starts the loader from the dataset's start, saying so."""
        super().restore(saved)
        if saved is None or saved.get("kind") != "energon":
            if self.verbose:
                print("checkpoint holds no energon loader state: reading data.path from its start", flush=True)
            return
        if saved["dp_size"] != self.dp_size:
            raise ConfigError(
                f"config error: checkpoint.load: its energon loader state is for {saved['dp_size']} data-parallel "
                f"ranks, this run has {self.dp_size}; data.kind energon resumes with the same data-parallel size"
            )
        if saved["num_workers"] != self.cfg.data.num_workers:
            raise ConfigError(
                f"config error: data.num_workers: the checkpoint's energon loader state is for {saved['num_workers']} "
                f"workers per rank, this run has {self.cfg.data.num_workers}; resume with the same number"
            )
        self._initial = pickle.loads(saved["states"][self.dp_rank])
        self.loader.restore_state_rank(self._initial)
