"""Save and resume with megatron-core distributed checkpointing.

Layout (Megatron-LM's): ``<save>/iter_0000100/`` holds one distributed checkpoint (model,
optimizer, LR scheduler, iteration) and ``<save>/latest_checkpointed_iteration.txt`` names the
newest complete one. A save writes ``iter_0000100.saving/``, checksums it into its manifest
(sizes and CRC-32 of its files), renames it to ``iter_0000100/`` (moving a damaged or stale folder
of that name aside first) and replaces the tracker atomically last, so a crash or a full disk
during a save leaves the previous checkpoint as the one that is resumed. Every loader of these
checkpoints (training, ``tools/convert_hf_checkpoint.py export``, ``tools/mllama_forward.py``)
goes through :func:`newest_intact`: a checkpoint damaged later is detected against its manifest
and the newest older intact one is used (:mod:`.checkpoint_integrity`); the one used and why is
printed. Before loading, the checkpoint's saved run config is compared with the run's
(:func:`check_same_model`) and so is its LR schedule (Megatron-LM's ``--override-opt_param-scheduler``
and ``--use-checkpoint-opt_param-scheduler`` choose between a changed one and the checkpoint's).

Parameters are saved as sharded tensors in global (unsplit) coordinates and the distributed
optimizer's state in its "fully reshardable" per-parameter form, so a checkpoint loads into any tensor,
pipeline or context-parallel layout and any data-parallel size.
"""

import contextlib
import errno
import logging
import os
import queue
import shutil
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.strategies import filesystem_async
from torch.distributed.checkpoint.api import CheckpointException

from ..core.transformer_config import SECTION_FIELDS
from .checkpoint_integrity import (
    MANIFEST,
    complete_iterations,
    on_rank0,
    rotate,
    verify,
    write_atomically,
    write_manifest,
)
from .config import ConfigError, RunConfig
from .setup import TrainState

TRACKER = "latest_checkpointed_iteration.txt"
# Suffixes of a save in progress and of the folder it replaces; never loaded, removed by the next save.
SAVING, REPLACED = ".saving", ".replaced"
# Suffix of a checkpoint of weights that diverged (set aside by the run that saved it; never loaded).
DIVERGED = ".diverged"
# What a failed checkpoint read or write raises: torch.distributed.checkpoint gathers the ranks'
# errors into a CheckpointException, which derives from BaseException, not Exception.
CHECKPOINT_ERRORS = (Exception, CheckpointException)
# megatron's checkpoint writer reports its file writes through a queue that by default lives in a
# helper process (a multiprocessing Manager). That process shares the trainer's process group, so the
# SIGTERM that torchrun (or Slurm) sends to the whole group kills it and the save in flight fails on
# that rank. Saves here are synchronous, in the trainer's own process: a queue of its threads does.
filesystem_async._results_queue = queue.Queue()


class CheckpointSaveError(RuntimeError):
    """A checkpoint could not be written (e.g. a full disk); the message is one line naming the folder.

    The unfinished folder is removed; the previous checkpoint and the tracker are as they were.
    """


def _optimizer_format(state: TrainState) -> dict:
    """The distributed optimizer's layout-independent format (its state per parameter, unsplit).

    On CPU its gathers go through megatron's gloo data-parallel groups ("mem-efficient" variant);
    both variants read each other's checkpoints.
    """
    return {
        "distrib_optim_sharding_type": "fully_reshardable",
        "distrib_optim_fully_reshardable_mem_efficient": state.device.type == "cpu",
    }


def _without_gathered_optimizer_state(common: dict) -> dict:
    """The common state dict as the ranks compare it before a save, less ``optimizer.param_state``.

    In the mem-efficient variant of :func:`_optimizer_format` only data-parallel rank 0 of each
    replica holds the gathered optimizer state; the other ranks' common state carries an empty
    ``param_state`` where rank 0's has none, which megatron would report on every save.
    """
    optimizer = common.get("optimizer")
    if not isinstance(optimizer, dict) or "param_state" not in optimizer:
        return common
    return {**common, "optimizer": {k: v for k, v in optimizer.items() if k != "param_state"}}


def checkpoint_dir(root: str | Path, iteration: int) -> Path:
    """The folder of the checkpoint of ``iteration`` under ``root``."""
    return Path(root) / f"iter_{iteration:07d}"


def _read_tracker(root: Path) -> tuple[int | None, str]:
    """The iteration the tracker names, or None and why there is none."""
    tracker = root / TRACKER
    try:
        text = tracker.read_bytes().decode("ascii", errors="replace").strip()
    except FileNotFoundError:
        return None, f"{TRACKER} is missing"
    if not text.isdigit():
        return None, f"{TRACKER} does not hold an iteration number ({text!r}: damaged?)"
    return int(text), ""


def tracked_iteration(root: str | Path) -> int | None:
    """The iteration the tracker under ``root`` names (None: missing or unreadable)."""
    return _read_tracker(Path(root))[0]


def _say(text: str) -> None:
    if dist.get_rank() == 0:
        print(text, flush=True)


def _materialize_adam_state(optimizer) -> None:
    """Give a fresh optimizer zero Adam moments and step, the structure a checkpoint loads into.

    megatron's optimizer ``state_dict`` (without apex / Transformer Engine) reads each parameter's
    ``step``, which torch's Adam creates only at its first step.
    """
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = opt.optimizer
        for group in inner.param_groups:
            for p in group["params"]:
                if not inner.state[p]:
                    inner.state[p].update(
                        exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p), step=torch.tensor(0.0)
                    )


class _StepIsNotAShard(dict):
    """A loaded parameter-state dict that answers None for keys it lacks (Adam's ``step``)."""

    def __missing__(self, key):
        return None


def _load_optimizer(optimizer, state_dict: dict) -> None:
    """``optimizer.load_state_dict`` working around megatron-core 0.19 with torch's Adam.

    Without apex / Transformer Engine, the distributed optimizer gives every parameter's state a
    ``step`` tensor, then copies the "fully reshardable" per-parameter state (which has no
    ``step``) over it key by key and fails on the missing key. A missing key now reads as "not a
    tensor", which that copy skips; ``step`` itself comes from the saved param groups.
    """
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        if hasattr(opt, "_set_main_param_and_optimizer_states"):
            original = type(opt)._set_main_param_and_optimizer_states
            opt._set_main_param_and_optimizer_states = lambda p, t, o=opt, f=original: f(o, p, _StepIsNotAShard(t))
    try:
        optimizer.load_state_dict(state_dict)
    finally:
        for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
            opt.__dict__.pop("_set_main_param_and_optimizer_states", None)
    # It also hands every parameter the same ``step`` tensor, which torch's Adam then increments
    # once per parameter: give each parameter its own.
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        for param_state in opt.optimizer.state.values():
            if isinstance(param_state.get("step"), torch.Tensor):
                param_state["step"] = param_state["step"].clone()


def _sharded_state(state: TrainState, is_loading: bool) -> dict:
    # Self- and cross-attention layers differ, so layers are keyed one by one, not stacked.
    model_sd = state.stage.sharded_state_dict(metadata={"non_homogeneous_layers": True})
    return {
        "model": model_sd,
        "optimizer": state.optimizer.sharded_state_dict(
            model_sd, is_loading=is_loading, metadata=_optimizer_format(state)
        ),
    }


def _untimed(name: str) -> AbstractContextManager:
    return contextlib.nullcontext()


def _prepare(root: Path, staging: Path) -> None:
    """An empty ``staging`` folder; the leftovers of interrupted saves (never loaded) are removed."""
    for leftover in [*root.glob(f"iter_*{SAVING}"), *root.glob(f"iter_*{REPLACED}")]:
        shutil.rmtree(leftover)
    staging.mkdir(parents=True)


def _set_aside(path: Path) -> None:
    """Rename a folder already at ``path`` (damaged, or a stale one of the same iteration) out of the way.

    One rename, not a deletion: a crash while deleting would leave a half-deleted folder under the
    checkpoint's own name.
    """
    if path.exists():
        path.rename(path.with_name(path.name + REPLACED))


def _publish(staging: Path, path: Path) -> None:
    staging.rename(path)
    shutil.rmtree(path.with_name(path.name + REPLACED), ignore_errors=True)


class _Collect(logging.Handler):
    def __init__(self, messages: list[str]) -> None:
        super().__init__(logging.ERROR)
        self.messages = messages

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@contextlib.contextmanager
def _writer_errors() -> Iterator[list[str]]:
    """The errors megatron's checkpoint writer logs meanwhile, kept off the console (reported once, by us).

    Its writer threads catch a failed file write (a full disk), log it and raise a RuntimeError
    that holds only the exception's class: the log is the one place that keeps ``[Errno 28] No
    space left on device``.
    """
    log = logging.getLogger(filesystem_async.__name__)
    messages: list[str] = []
    handler, propagate = _Collect(messages), log.propagate
    log.addHandler(handler)
    log.propagate = False
    try:
        yield messages
    finally:
        log.removeHandler(handler)
        log.propagate = propagate


def _os_error(exc: BaseException) -> OSError | None:
    """The OSError behind a failed save, also inside torch.distributed.checkpoint's per-rank failures."""
    if isinstance(exc, OSError):
        return exc
    if isinstance(exc, CheckpointException):
        for failure, _ in exc.failures.values():
            if found := _os_error(failure):
                return found
    return None


def _folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file()) if path.is_dir() else 0


def _out_of_space(root: Path) -> bool:
    """Whether the file system of ``root`` has less room than one more checkpoint (the newest complete one's
    size, at least 1 MiB): what is left after a write failed for want of space."""
    newest = complete_iterations(root)
    needed = max(_folder_bytes(checkpoint_dir(root, newest[0])) if newest else 0, 2**20)
    return shutil.disk_usage(root).free < needed


def _file_system_reason(exc: BaseException, logged: list[str], root: Path) -> str | None:
    """What failed when a save failed writing files, else None (a bug: its traceback is kept).

    torch's writer turns a full disk inside a tensor's record into ``[enforce fail at
    inline_container.cc:...] unexpected pos ...`` without the errno; the free space says what it was.
    """
    if error := _os_error(exc):
        return str(error)
    if not isinstance(exc, CheckpointException):
        return None
    # megatron raises it on every rank together, with the details on the rank that failed: gather them.
    reports = [None] * dist.get_world_size()
    dist.all_gather_object(reports, (logged[0] if logged else None, _out_of_space(root)))
    reason = next((r for r, _ in reports if r), None)
    no_space = os.strerror(errno.ENOSPC)
    if reason is not None and no_space not in reason and any(full for _, full in reports):
        reason = f"{no_space} (the file system of {root} is full; the writer said: {reason})"
    return reason


def _save_failed(
    root: Path, path: Path, staging: Path, exc: BaseException, logged: list[str]
) -> CheckpointSaveError | None:
    """Remove what an unfinished save left; the one-line error to raise for a file-system failure, else None."""
    unfinished = staging.exists()
    reason = _file_system_reason(exc, logged, root)  # before the unfinished files free their space
    if dist.get_rank() == 0:
        shutil.rmtree(staging, ignore_errors=True)
    if reason is None:
        return None
    tracked, _ = _read_tracker(root)
    kept = f"removed the unfinished {staging.name}" if unfinished else f"{path.name} is complete but not tracked"
    tracker = f"{root / TRACKER} still names iter_{tracked:07d}" if tracked is not None else "nothing is tracked yet"
    return CheckpointSaveError(f"could not save {path}: {reason}; {kept}; {tracker}")


def write_checkpoint(
    sharded: dict,
    root: str | Path,
    iteration: int,
    phase: Callable[[str], AbstractContextManager] = _untimed,
) -> Path:
    """Write the distributed checkpoint ``sharded`` as ``root/iter_<iteration>`` and track it (collective).

    ``phase(name)`` wraps each step (the training loop's hang watchdog names the step that hangs).
    A file-system failure (a full disk) raises :class:`CheckpointSaveError` on every rank, after
    removing the unfinished folder; the previous checkpoint and the tracker are not touched.
    """
    root = Path(root)
    path = checkpoint_dir(root, iteration)
    staging = path.with_name(path.name + SAVING)
    logged: list[str] = []
    try:
        with phase("prepare"):
            on_rank0(lambda: _prepare(root, staging))
        with phase("write"), _writer_errors() as logged:
            dist_checkpointing.save(
                sharded, str(staging), preprocess_common_before_consistancy_check=_without_gathered_optimizer_state
            )
        with phase("manifest"):
            write_manifest(staging)
        with phase("set aside"):
            on_rank0(lambda: _set_aside(path))
        with phase("publish"):
            on_rank0(lambda: _publish(staging, path))
        with phase("tracker"):  # last: until here the tracker names the previous checkpoint
            on_rank0(lambda: write_atomically(root / TRACKER, str(iteration)))
    except CHECKPOINT_ERRORS as exc:
        error = _save_failed(root, path, staging, exc, logged)
        if error is None:
            raise
        raise error from exc
    return path


def save_checkpoint(
    state: TrainState,
    cfg: RunConfig,
    iteration: int,
    root: str | Path,
    phase: Callable[[str], AbstractContextManager] = _untimed,
    data_state: dict | None = None,
) -> Path:
    """Write the training checkpoint of ``iteration`` under ``root`` (:func:`write_checkpoint`), then
    delete the checkpoints beyond ``checkpoint.keep_last`` (collective over all ranks).

    ``data_state`` (the same on every rank) is the data loader's state: the bad samples found so far, and
    the position of a loader whose samples do not follow from the iteration alone (``data.kind: energon``);
    it is kept in the common state.
    """
    sharded = _sharded_state(state, is_loading=False)
    sharded["scheduler"] = state.scheduler.state_dict()
    sharded["iteration"] = iteration
    if data_state is not None:
        sharded["data_loader"] = data_state
    sharded["run_config"] = cfg.model_dump(mode="json")
    path = write_checkpoint(sharded, root, iteration, phase)
    with phase("rotate"):
        rotate(Path(root), cfg.checkpoint.keep_last, iteration)
    dist.barrier()
    return path


def set_aside_diverged(root: str | Path, paths: list[Path]) -> int | None:
    """Rename this run's checkpoints ``paths`` (of weights that diverged) to ``iter_N.diverged`` and track the
    newest complete checkpoint below them, or none (collective). Returns the tracked iteration.

    Nothing is deleted: the folders stay for inspection, out of every loader's and the rotation's sight.
    """
    root = Path(root)
    below = min(int(p.name.removeprefix("iter_")) for p in paths)

    def move() -> None:
        for path in paths:
            target = path.with_name(path.name + DIVERGED)
            shutil.rmtree(target, ignore_errors=True)  # an earlier divergence at the same iteration
            path.rename(target)
        older = [i for i in complete_iterations(root) if i < below]
        if older:
            write_atomically(root / TRACKER, str(older[0]))
        else:
            (root / TRACKER).unlink(missing_ok=True)

    on_rank0(move)
    tracked, _ = _read_tracker(root)
    return tracked


@dataclass(frozen=True)
class Chosen:
    """The checkpoint a loader uses (:func:`newest_intact`) and why that one.

    ``verified``: its files matched its manifest; False only for a checkpoint set saved before manifests
    existed (none of them has one).
    """

    iteration: int
    path: Path
    reason: str
    verified: bool


def _problem(path: Path, with_manifest: list[int]) -> str | None:
    """What is wrong with the checkpoint at ``path`` (None: intact) when ``with_manifest`` have a manifest
    (collective)."""
    if not path.is_dir():
        return "the folder is missing"
    if with_manifest and not (path / MANIFEST).is_file():
        # Every save writes one before the tracker names the checkpoint: beside checkpoints that have
        # one, its absence is damage, not age.
        return f"{MANIFEST} is missing, while iter_{with_manifest[0]:07d} has one (deleted or damaged?)"
    return verify(path)


def newest_intact(root: str | Path, setting: str = "checkpoint.load") -> Chosen | None:
    """The checkpoint to load under ``root``: the tracker's if it is intact, else the newest older intact
    one (collective). Every checkpoint passed over is printed with the reason, then the one used and why.

    A missing or unreadable tracker falls back to the newest checkpoint that has a manifest.
    Checkpoints newer than the tracker are not used (their save did not finish, or the tracker was
    set back on purpose). A checkpoint without a manifest is damaged, unless no checkpoint under ``root``
    has one (saved before manifests existed): then it is used unverified. None when ``root`` holds no
    checkpoint; ConfigError naming ``setting`` and every problem when none is intact.
    """
    root = Path(root)
    tracked, problem = _read_tracker(root)
    complete = complete_iterations(root)
    if tracked is None:
        if not complete and not (root / TRACKER).exists():
            return None
        _say(f"checkpoint: {root}: {problem}; using the newest intact checkpoint")
        candidates, problems, reason = complete, [problem], f"the newest intact checkpoint ({problem})"
    else:
        newer = [f"iter_{i:07d}" for i in complete if i > tracked]
        if newer:
            _say(
                f"checkpoint: {', '.join(newer)} under {root} are newer than the tracker's iteration {tracked}; not "
                "used (their save did not finish, or the tracker was set back)"
            )
        candidates, problems, reason = [tracked] + [i for i in complete if i < tracked], [], "the tracker's"
    skipped = []
    for iteration in candidates:
        path = checkpoint_dir(root, iteration)
        problem = _problem(path, complete)
        if problem is None:
            if skipped:
                reason = f"fallback from {', '.join(skipped)} (not intact)"
            verified = (path / MANIFEST).is_file()
            if not verified:
                reason += f"; unverified: no checkpoint under {root} has a {MANIFEST} (saved before manifests existed?)"
            _say(f"checkpoint: using {path} (iteration {iteration}): {reason}")
            return Chosen(iteration, path, reason, verified)
        problems.append(f"{path.name}: {problem}")
        skipped.append(path.name)
        _say(f"checkpoint {path} is not intact ({problem}); trying an older one")
    raise ConfigError(f"config error: {setting}: no intact checkpoint under {root} ({'; '.join(problems)})")


def _first_line(exc: BaseException) -> str:
    """The first line of what went wrong, looking inside torch.distributed.checkpoint's per-rank failures."""
    if isinstance(exc, CheckpointException) and exc.failures:
        return _first_line(next(iter(exc.failures.values()))[0])
    return (str(exc).splitlines() or [type(exc).__name__])[0]


def _mismatch(path: Path, exc: BaseException) -> ConfigError:
    return ConfigError(
        f"config error: checkpoint.load: {path} does not match this model (architecture or vocabulary "
        f"differ?): {_first_line(exc)}"
    )


def padded_vocab_size(path: str | Path) -> int:
    """Rows of the checkpoint's (padded) embedding, from its metadata."""
    return dist_checkpointing.load_tensors_metadata(str(path))["embedding.word_embeddings.weight"].global_shape[0]


# Settings of the model section that are not its architecture: how the layers run or start, or another
# spelling of a compared setting (the vocabulary padding: compared as the embedding's rows).
_NOT_ARCHITECTURE = frozenset(
    {
        "text.init_method_std",
        "text.cross_attention_every_n_layers",
        "text.make_vocab_size_divisible_by",
        "vision.activation_checkpointing",
        "freeze_vision_encoder",
        *(f"cross_attention.{name}" for name in SECTION_FIELDS),
    }
)
# Settings that change what the same weights compute, not which weights there are: a deliberate change
# when fine-tuning (e.g. blind_rows, docs/checkpoints.md) is said, not refused.
_SAME_WEIGHTS = frozenset(
    {
        "text.rotary_base",
        "text.rope_scaling",
        "text.rope_scaling_factor",
        "text.norm_epsilon",
        "vision.norm_eps",
        "vision.feature_layer",
        "cross_attention.blind_rows",
    }
)
_SHOWN_DIFFERENCES = 10


def _leaves(tree: Any, prefix: str = "") -> dict[str, Any]:
    """``{dotted name: value}`` of a nested dict's leaves (lists and None are leaves)."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    return {
        name: value
        for key, sub in tree.items()
        for name, value in _leaves(sub, f"{prefix}.{key}" if prefix else key).items()
    }


def _changes(changed: list[tuple[str, Any, Any]]) -> str:
    """``a.b 4 -> 3, c [1, 3] -> [1]``, the first few, then how many more."""
    shown = ", ".join(f"{name} {theirs!r} -> {ours!r}" for name, theirs, ours in changed[:_SHOWN_DIFFERENCES])
    more = len(changed) - _SHOWN_DIFFERENCES
    return shown + (f" and {more} more" if more > 0 else "")


def check_same_model(path: Path, common: dict, cfg: RunConfig, vocab_rows: int, setting: str) -> None:
    """ConfigError naming ``setting`` and every architectural difference between the model of the checkpoint
    at ``path`` (its saved run config, ``common``: its common state) and this run's ``cfg`` with ``vocab_rows``
    padded vocabulary rows; changes that keep the weights' shapes are printed. A checkpoint saved before
    checkpoints held a run config is not checked, and that is printed."""
    saved = common.get("run_config")
    if saved is None:
        _say(f"checkpoint {path} holds no run config (saved by an older version): the architecture check was skipped")
        return
    theirs, ours = _leaves(saved["model"]), _leaves(cfg.model.model_dump(mode="json"))
    changed = [
        (f"model.{name}", theirs.get(name), ours.get(name))
        for name in dict.fromkeys([*theirs, *ours])
        if theirs.get(name) != ours.get(name) and name not in _NOT_ARCHITECTURE
    ]
    stored_rows = padded_vocab_size(path)
    architecture = [c for c in changed if c[0].removeprefix("model.") not in _SAME_WEIGHTS]
    if stored_rows != vocab_rows:
        architecture.append(("vocabulary (padded embedding rows)", stored_rows, vocab_rows))
    if architecture:
        raise ConfigError(
            f"config error: {setting}: {path} holds another model than this run's (checkpoint -> this run): "
            f"{_changes(architecture)}; use the checkpoint's model settings (its run config) or another checkpoint"
        )
    if behaviour := [c for c in changed if c not in architecture]:
        _say(f"checkpoint {path}: this run changes {_changes(behaviour)} (checkpoint -> this run); the weights load")


# The run settings behind the values megatron's OptimizerParamScheduler saves.
_SCHEDULE_SETTINGS = {
    "max_lr": "training.lr",
    "min_lr": "training.min_lr",
    "lr_warmup_steps": "training.lr_warmup_iters",
    "lr_decay_steps": "training.train_iters",
    "lr_decay_style": "training.lr_decay_style",
    "start_wd": "training.weight_decay",
    "end_wd": "training.weight_decay",
    "wd_incr_steps": "training.train_iters",
}


def _schedule_changes(saved: dict, ours: dict) -> list[tuple[str, Any, Any]]:
    """The run settings whose schedule values differ between the checkpoint's scheduler state and ours."""
    changed: dict[str, tuple[str, Any, Any]] = {}
    for key, setting in _SCHEDULE_SETTINGS.items():
        if key in saved and saved[key] != ours[key]:
            changed.setdefault(setting, (setting, saved[key], ours[key]))
    return list(changed.values())


def _load_schedule(state: TrainState, cfg: RunConfig, saved_schedule: dict, optimizer_state: dict) -> None:
    """Load the optimizer and LR schedule with megatron's semantics for a changed schedule.

    megatron pairs the optimizer's parameter groups with the saved ones by their settings, the learning
    rates included, so the groups take the checkpoint's rates for the load;
    ``--override-opt_param-scheduler`` then gives them (and the schedule) the run's values,
    ``--use-checkpoint-opt_param-scheduler`` keeps the checkpoint's.
    """
    groups = state.optimizer.param_groups
    run_rates = [(g["max_lr"], g["min_lr"]) for g in groups]
    for group in groups:
        group["max_lr"], group["min_lr"] = saved_schedule["max_lr"], saved_schedule["min_lr"]
    _load_optimizer(state.optimizer, optimizer_state)
    if cfg.checkpoint.override_opt_param_scheduler:
        for group, (max_lr, min_lr) in zip(state.optimizer.param_groups, run_rates, strict=True):
            group["max_lr"], group["min_lr"] = max_lr, min_lr
    state.scheduler.load_state_dict(saved_schedule)


def load_model_weights(mllama, path: str | Path) -> None:
    """Load only the model weights of the checkpoint at ``path`` into ``mllama`` (any layout; collective)."""
    sharded = {"model": mllama.sharded_state_dict(metadata={"non_homogeneous_layers": True})}
    try:
        loaded = dist_checkpointing.load(sharded, str(path))
    except CHECKPOINT_ERRORS as exc:
        raise _mismatch(Path(path), exc) from exc
    mllama.load_state_dict(loaded["model"])


def load_checkpoint(
    state: TrainState, cfg: RunConfig, restore_data: Callable[[dict | None], None] | None = None
) -> int:
    """Load the newest checkpoint under ``checkpoint.load`` into ``state``; returns its iteration (0: none yet).

    The checkpoint's model must be this run's (:func:`check_same_model`), and its LR schedule too unless
    ``checkpoint.override_opt_param_scheduler`` (this run's schedule from the checkpoint's iteration on) or
    ``checkpoint.use_checkpoint_opt_param_scheduler`` (the checkpoint's) is set: else a ConfigError
    naming the changed settings. ``restore_data`` gets the checkpoint's saved data-loader state (None
    when it has none) when a training checkpoint was loaded.

    A model-only checkpoint (``tools/convert_hf_checkpoint.py import``) loads the weights and
    starts at iteration 0 with a fresh optimizer and LR schedule.
    """
    root = cfg.checkpoint.load
    chosen = newest_intact(root)
    if chosen is None:  # Megatron-LM's convention: --load == --save, nothing there yet
        _say(f"--load {root}: no checkpoint there, starting fresh")
        return 0
    path = chosen.path
    common = dist_checkpointing.load_common_state_dict(str(path))
    check_same_model(path, common, cfg, state.stage.text.padded_vocab_size, "checkpoint.load")
    if "scheduler" not in common:  # training checkpoints always hold the LR scheduler's state
        load_model_weights(state.stage, path)
        state.optimizer.reload_model_params()  # main (fp32) parameter copies were made from the random init
        _say(
            f"--load {root}: model-only checkpoint {path}: loaded the weights; starting at iteration 0 with a "
            "fresh optimizer"
        )
        return 0
    ck = cfg.checkpoint
    changed = _schedule_changes(common["scheduler"], state.scheduler.state_dict())
    if changed and not (ck.override_opt_param_scheduler or ck.use_checkpoint_opt_param_scheduler):
        raise ConfigError(
            f"config error: checkpoint.load: this run's LR schedule differs from the checkpoint's {path.name} "
            f"(checkpoint -> this run): {_changes(changed)}; pass --override-opt_param-scheduler (this run's values "
            "from the checkpoint's iteration on) or --use-checkpoint-opt_param-scheduler (the checkpoint's)"
        )
    if changed:
        kept = "this run's" if ck.override_opt_param_scheduler else "the checkpoint's"
        _say(f"checkpoint {path}: the LR schedule changed ({_changes(changed)}); using {kept}")
    _materialize_adam_state(state.optimizer)
    sharded = _sharded_state(state, is_loading=True)
    try:
        loaded = dist_checkpointing.load(sharded, str(path))
    except CHECKPOINT_ERRORS as exc:
        raise _mismatch(path, exc) from exc
    state.stage.load_state_dict(loaded["model"])
    _load_schedule(state, cfg, loaded["scheduler"], loaded["optimizer"])
    if restore_data is not None:
        restore_data(loaded.get("data_loader"))
    return int(loaded["iteration"])
