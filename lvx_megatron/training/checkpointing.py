"""Save and resume with megatron-core distributed checkpointing.

Layout (Megatron-LM's): ``<save>/iter_0000100/`` holds one distributed checkpoint (model,
optimizer, LR scheduler, iteration) and ``<save>/latest_checkpointed_iteration.txt`` names the
newest complete one. The tracker is replaced atomically only after every rank finished writing
and the checkpoint's manifest (sizes and CRC-32 of its files) exists, so a crash during a save
leaves the previous checkpoint as the one that is resumed; a checkpoint damaged later is detected
on load and the newest older intact one is used (:mod:`.checkpoint_integrity`).

Parameters are saved as sharded tensors in global (unsplit) coordinates and the distributed
optimizer's state in its "fully reshardable" per-parameter form, so a checkpoint loads into any tensor,
pipeline or context-parallel layout and any data-parallel size.
"""

import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing

from .checkpoint_integrity import complete_iterations, rotate, verify, write_manifest
from .config import ConfigError, RunConfig
from .setup import TrainState

TRACKER = "latest_checkpointed_iteration.txt"


def _optimizer_format(state: TrainState) -> dict:
    """The distributed optimizer's layout-independent format (its state per parameter, unsplit).

    On CPU its gathers go through megatron's gloo data-parallel groups ("mem-efficient" variant);
    both variants read each other's checkpoints.
    """
    return {
        "distrib_optim_sharding_type": "fully_reshardable",
        "distrib_optim_fully_reshardable_mem_efficient": state.device.type == "cpu",
    }


def checkpoint_dir(root: str | Path, iteration: int) -> Path:
    return Path(root) / f"iter_{iteration:07d}"


def latest_iteration(root: str | Path) -> int | None:
    """The newest complete checkpoint's iteration under ``root``, or None."""
    tracker = Path(root) / TRACKER
    if not tracker.is_file():
        return None
    text = tracker.read_text().strip()
    if not text.isdigit():
        raise ConfigError(f"config error: checkpoint.load: {tracker} does not hold an iteration number: {text!r}")
    return int(text)


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
    model_sd = state.mllama.sharded_state_dict(metadata={"non_homogeneous_layers": True})
    return {
        "model": model_sd,
        "optimizer": state.optimizer.sharded_state_dict(
            model_sd, is_loading=is_loading, metadata=_optimizer_format(state)
        ),
    }


def save_checkpoint(state: TrainState, cfg: RunConfig, iteration: int, root: str | Path) -> Path:
    """Write the checkpoint of ``iteration`` under ``root`` (collective over all ranks)."""
    path = checkpoint_dir(root, iteration)
    if dist.get_rank() == 0:
        if path.exists():  # left by a run that crashed after this iteration, or an older run
            shutil.rmtree(path)
        path.mkdir(parents=True)
    dist.barrier()
    sharded = _sharded_state(state, is_loading=False)
    sharded["scheduler"] = state.scheduler.state_dict()
    sharded["iteration"] = iteration
    sharded["run_config"] = cfg.model_dump(mode="json")
    dist_checkpointing.save(sharded, str(path))
    dist.barrier()
    write_manifest(path)
    if dist.get_rank() == 0:
        tmp = Path(root) / (TRACKER + ".tmp")
        tmp.write_text(str(iteration))
        os.replace(tmp, Path(root) / TRACKER)
    rotate(Path(root), cfg.checkpoint.keep_last, iteration)
    dist.barrier()
    return path


def newest_intact(root: str | Path) -> tuple[int, Path] | None:
    """The tracker's checkpoint if it is intact, else the newest older intact one (collective).

    None when ``root`` holds no checkpoint yet; ConfigError when none of them is intact.
    """
    tracked = latest_iteration(root)
    if tracked is None:
        return None
    candidates = [tracked] + [i for i in complete_iterations(Path(root)) if i < tracked]
    problems = []
    for iteration in candidates:
        path = checkpoint_dir(root, iteration)
        problem = verify(path) if path.is_dir() else "the folder is missing"
        if problem is None:
            return iteration, path
        problems.append(f"{path.name}: {problem}")
        if dist.get_rank() == 0:
            print(f"checkpoint {path} is not intact ({problem}); trying the previous one", flush=True)
    raise ConfigError(f"config error: checkpoint.load: no intact checkpoint under {root} ({'; '.join(problems)})")


def _mismatch(path: Path, exc: Exception) -> ConfigError:
    return ConfigError(
        f"config error: checkpoint.load: {path} does not match this model (architecture or vocabulary "
        f"differ?): {str(exc).splitlines()[0]}"
    )


def is_model_only(path: str | Path) -> bool:
    """Whether the checkpoint at ``path`` holds only model weights (e.g. one imported from Hugging Face).

    Training checkpoints always hold the LR scheduler's state in their common (non-sharded) part.
    """
    return "scheduler" not in dist_checkpointing.load_common_state_dict(str(path))


def load_model_weights(mllama, path: str | Path) -> None:
    """Load only the model weights of the checkpoint at ``path`` into ``mllama`` (any layout; collective)."""
    sharded = {"model": mllama.sharded_state_dict(metadata={"non_homogeneous_layers": True})}
    try:
        loaded = dist_checkpointing.load(sharded, str(path))
    except Exception as exc:
        raise _mismatch(Path(path), exc) from exc
    mllama.load_state_dict(loaded["model"])


def load_checkpoint(state: TrainState, root: str | Path) -> int:
    """Load the newest checkpoint under ``root`` into ``state``; returns its iteration (0: none yet).

    A model-only checkpoint (``tools/convert_hf_checkpoint.py import``) loads the weights and
    starts at iteration 0 with a fresh optimizer and LR schedule.
    """
    found = newest_intact(root)
    if found is None:  # Megatron-LM's convention: --load == --save, nothing there yet
        return 0
    _, path = found
    if is_model_only(path):
        load_model_weights(state.mllama, path)
        state.optimizer.reload_model_params()  # main (fp32) parameter copies were made from the random init
        if dist.get_rank() == 0:
            print(
                f"--load {root}: model-only checkpoint {path}: loaded the weights; starting at iteration 0 with a "
                "fresh optimizer",
                flush=True,
            )
        return 0
    _materialize_adam_state(state.optimizer)
    sharded = _sharded_state(state, is_loading=True)
    try:
        loaded = dist_checkpointing.load(sharded, str(path))
    except Exception as exc:
        raise _mismatch(path, exc) from exc
    state.mllama.load_state_dict(loaded["model"])
    _load_optimizer(state.optimizer, loaded["optimizer"])
    state.scheduler.load_state_dict(loaded["scheduler"])
    return int(loaded["iteration"])
