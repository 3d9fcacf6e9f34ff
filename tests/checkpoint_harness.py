"""Checkpoint faults (damaged files, stale trackers, saves killed or out of disk) and the three loaders of
training checkpoints (the trainer, ``tools/convert_hf_checkpoint.py export``, ``tools/mllama_forward.py``),
all run in one gloo worker so that the model is built and loaded in-process for every case."""

import builtins
import contextlib
import errno
import gc
import io
import os
import shutil
import traceback
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist
import yaml
from train_harness import TINY, run_trainers, small_run

TOOLS = Path(__file__).resolve().parents[1] / "tools"
TRACKER = "latest_checkpointed_iteration.txt"
EXPORT_VOCAB = 29  # the --vocab-size that docs/checkpoints.md exports tiny.yaml's model with


class Killed(BaseException):
    """Stands for SIGKILL inside a save: no handler runs (the save catches Exception subclasses only)."""


def damage(path: Path, fault: str) -> None:
    """Make ``path`` (a file, or a folder for "missing") missing, truncated to half its bytes, or flip the
    lowest bit of its middle byte."""
    if fault == "missing" and path.is_dir():
        shutil.rmtree(path)
        return
    if fault == "missing":
        path.unlink()
        return
    data = bytearray(path.read_bytes())
    if fault == "truncated":
        path.write_bytes(bytes(data[: len(data) // 2]))
    elif fault == "bitflip":
        data[len(data) // 2] ^= 0x01
        path.write_bytes(bytes(data))
    else:
        raise ValueError(f"unknown fault {fault!r}")


def flip_a_weight(folder: Path, key: str) -> None:
    """Flip the top exponent bit of a float32 in the middle of tensor ``key``: the weight becomes ~1e37.

    The tensor is a ``torch.save`` archive at its offset in the ``.distcp`` file, whose data records
    start at multiples of 64 bytes; byte 3 of a little-endian float holds its sign and top exponent bits.
    """
    from torch.distributed.checkpoint import FileSystemReader

    stored = FileSystemReader(str(folder)).read_metadata().storage_data
    info = next(where for index, where in stored.items() if index.fqn == key)
    path = folder / info.relative_path
    data = bytearray(path.read_bytes())
    data[info.offset + info.length // 2 // 64 * 64 + 3] ^= 0x40
    path.write_bytes(bytes(data))


class _FailingFile:
    """A file opened for writing that takes ``room`` bytes (None: half of its first write), stores what fits of
    the write that needs more, then raises ``error`` (noted in ``failed``)."""

    def __init__(self, file, error: BaseException, room: int | None, failed: list) -> None:
        self._file, self._error, self._room, self._failed = file, error, room, failed

    def write(self, data):
        data = data if isinstance(data, str) else memoryview(data).cast("B")  # sliced by character or byte
        room = len(data) // 2 if self._room is None else self._room
        if len(data) <= room:
            self._room = room - len(data)
            return self._file.write(data)
        self._file.write(data[:room])
        self._file.flush()
        self._failed.append(self._error)
        raise self._error

    def __getattr__(self, name):
        return getattr(self._file, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self._file.close()


@contextlib.contextmanager
def failing_writes(name: str, error: BaseException, room: int | None = None, failed: list | None = None):
    """Writes to files named ``name`` (or its temporary ``name.tmp``) fail with ``error`` once ``room`` bytes
    are written (default: midway through the first write): with ENOSPC, a disk that fills up while that file
    is written; with :class:`Killed`, a kill at that moment. Each failure is appended to ``failed``.

    Every opener goes through ``builtins.open`` or ``io.open`` (pathlib, megatron's writer threads,
    torch.distributed.checkpoint), so the failure takes the same path as a real one.
    """
    real, failed = io.open, [] if failed is None else failed

    def opener(file, mode="r", *args, **kwargs):
        handle = real(file, mode, *args, **kwargs)
        if isinstance(file, str | os.PathLike) and set(mode) & set("wax") and Path(file).name in (name, name + ".tmp"):
            return _FailingFile(handle, error, room, failed)
        return handle

    builtins.open = io.open = opener
    try:
        yield
    finally:
        builtins.open = io.open = real


def disk_full() -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@contextlib.contextmanager
def full_disk(name: str, room: int | None = None):
    """A disk that fills up while ``name`` is written (:func:`failing_writes` with ENOSPC) and from then on
    reports no free space."""
    real, failed = shutil.disk_usage, []

    def usage(path):
        found = real(path)
        return type(found)(found.total, found.total, 0) if failed else found

    shutil.disk_usage = usage
    try:
        with failing_writes(name, disk_full(), room, failed):
            yield
    finally:
        shutil.disk_usage = real


def kill_at(target: str):
    """A ``phase`` callback for ``save_checkpoint`` that kills the save as it enters step ``target``."""

    def phase(name: str):
        if name == target:
            raise Killed(f"killed at {name}")
        return contextlib.nullcontext()

    return phase


def forward_inputs() -> dict:
    """HF-processor-style inputs for tiny.yaml's model: 2 samples, 2 one-tile 32x32 images each."""
    gen = torch.Generator().manual_seed(0)
    b, s, n = 2, 10, 2
    xmask = torch.zeros(b, s, n, 1, dtype=torch.long)
    xmask[:, 2:, 0] = 1
    xmask[:, 6:, 1] = 1
    return dict(
        input_ids=torch.randint(4, EXPORT_VOCAB, (b, s), generator=gen),
        attention_mask=torch.ones(b, s, dtype=torch.long),
        pixel_values=torch.randn(b, n, 1, 3, 32, 32, generator=gen),
        aspect_ratio_ids=torch.ones(b, n, dtype=torch.long),
        aspect_ratio_mask=torch.ones(b, n, 1, dtype=torch.long),
        cross_attention_mask=xmask,
    )


def _captured(fn, *args):
    """``fn(*args)``'s result or exception, with what it printed to stdout and stderr."""
    out, err = io.StringIO(), io.StringIO()
    result, error = None, None
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            result = fn(*args)
        except BaseException as exc:
            error = exc
            if not isinstance(exc, SystemExit):
                err.write(traceback.format_exc())  # what the command line would show
    return result, error, out.getvalue(), err.getvalue()


@contextlib.contextmanager
def own_process_groups():
    """Destroy the process groups created meanwhile on exit.

    megatron's ``destroy_model_parallel`` drops most of its groups without destroying them, and each keeps
    its gloo threads: in one process that builds the model parallel groups for dozens of loads
    they pile up by the thousand and slow everything down.
    """
    created, real = [], dist.new_group

    def new_group(*args, **kwargs):
        group = real(*args, **kwargs)
        created.append(group)
        return group

    dist.new_group = new_group
    try:
        yield
    finally:
        dist.new_group = real
        for group in created:
            with contextlib.suppress(ValueError):  # one that megatron destroyed itself (its gloo groups)
                dist.destroy_process_group(group)


def _weights(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items() if isinstance(v, torch.Tensor)}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class Loaders:
    """The three loaders on one folder; each outcome says what they printed and what they produced."""

    def __init__(self, data: str, work: Path) -> None:
        self.data, self.work = data, work
        work.mkdir(parents=True, exist_ok=True)
        self.inputs = work / "inputs.pt"
        torch.save(forward_inputs(), self.inputs)

    def config(self, ckpt: Path, **overrides):
        from lvx_megatron.training.config import load_config

        run = small_run(self.data, str(self.work / "run"), **{"checkpoint.load": str(ckpt), **overrides})
        return load_config(TINY, run)

    @staticmethod
    def state(cfg):
        """What the trainer loads a checkpoint into (model, optimizer, LR schedule), without its data."""
        from lvx_megatron.training.data import make_tokenizer
        from lvx_megatron.training.setup import build_train_state, init_distributed

        return build_train_state(cfg, make_tokenizer(cfg).vocab_size, init_distributed())

    def train(self, ckpt: Path, **overrides) -> dict:
        """The trainer's loader: ``load_checkpoint``, as ``Trainer`` calls it (the full trainer reads the
        data shards' index, which would dominate the matrix's time)."""
        from megatron.core import parallel_state

        from lvx_megatron.training.checkpointing import load_checkpoint

        def load():
            cfg = self.config(ckpt, **overrides)
            state = self.state(cfg)
            iteration = load_checkpoint(state, cfg)
            return iteration, _weights(state.stage), state.optimizer.param_groups[0]["lr"]

        with own_process_groups():
            loaded, error, out, err = _captured(load)
            parallel_state.destroy_model_parallel()
        iteration, weights, lr = loaded or (None, None, None)
        return {"error": error, "stdout": out, "stderr": err, "output": weights, "iteration": iteration, "lr": lr}

    def export(self, ckpt: Path, out_dir: Path | None = None, flags: tuple[str, ...] = ()) -> dict:
        from safetensors.torch import load_file

        from tools.convert_hf_checkpoint import main

        out_dir = out_dir or self.work / "exported"
        shutil.rmtree(out_dir, ignore_errors=True)
        argv = ["export", "--load", str(ckpt), "--out", str(out_dir), "--vocab-size", str(EXPORT_VOCAB), *flags]
        with own_process_groups():
            rc, error, out, err = _captured(main, argv)
        weights = load_file(out_dir / "model.safetensors") if rc == 0 else None
        return {"rc": rc, "error": error, "stdout": out, "stderr": err, "output": weights}

    def forward(self, ckpt: Path, flags: tuple[str, ...] = ()) -> dict:
        from tools.mllama_forward import main

        output = self.work / "logits.pt"
        output.unlink(missing_ok=True)
        argv = ["--load", str(ckpt), "--inputs", str(self.inputs), "--output", str(output), *flags]
        with own_process_groups():
            rc, error, out, err = _captured(main, argv)
        logits = {"logits": torch.load(output)} if rc == 0 else None
        return {"rc": rc, "error": error, "stdout": out, "stderr": err, "output": logits}


@contextlib.contextmanager
def perturbed(loaders: Loaders, base: Path, **overrides):
    """The newest checkpoint's train state with every weight moved (so that it differs), and its config."""
    from megatron.core import parallel_state

    from lvx_megatron.training.checkpointing import load_checkpoint

    with own_process_groups():  # the loaders rebuild megatron's process groups: a state is used in one go
        cfg = loaders.config(base, **overrides)
        state = loaders.state(cfg)
        load_checkpoint(state, cfg)
        with torch.no_grad():
            for param in state.stage.parameters():
                param.add_(0.25)
        state.optimizer.reload_model_params()
        try:
            yield SimpleNamespace(state=state, cfg=cfg)
        finally:
            parallel_state.destroy_model_parallel()


def _save_fault(ckpt: Path, spec: dict, saver) -> dict:
    """One faulty save of ``saver``'s state into ``ckpt``; its error and the folder afterwards."""
    from lvx_megatron.training.checkpointing import save_checkpoint

    iteration = spec["iteration"]
    phase = {"phase": kill_at(spec["kill"])} if "kill" in spec else {}
    injected = contextlib.nullcontext()
    if "kill_writing" in spec:
        injected = failing_writes(spec["kill_writing"], Killed("killed while writing"))
    elif "full_disk" in spec:
        injected = full_disk(spec["full_disk"], spec.get("room"))

    def save():
        with injected:
            return save_checkpoint(saver.state, saver.cfg, iteration, ckpt, **phase)

    _, error, out, err = _captured(save)
    return {
        "error": error,
        "stdout": out,
        "stderr": err,
        "listing": sorted(p.name for p in ckpt.iterdir()),
        "tracker": (ckpt / TRACKER).read_text() if (ckpt / TRACKER).exists() else None,
    }


def _resave(ckpt: Path, iteration: int, saver) -> dict:
    """A clean save after the fault: it must succeed, track the new checkpoint and leave no leftovers."""
    from lvx_megatron.training.checkpoint_integrity import verify
    from lvx_megatron.training.checkpointing import checkpoint_dir, save_checkpoint

    _, error, _, _ = _captured(save_checkpoint, saver.state, saver.cfg, iteration, ckpt)
    return {
        "error": error,
        "listing": sorted(p.name for p in ckpt.iterdir()),
        "tracker": (ckpt / TRACKER).read_text(),
        "problem": verify(checkpoint_dir(ckpt, iteration)),
    }


def _resume(loaders: Loaders, ckpt: Path, spec: dict) -> dict:
    """Train from ``ckpt`` into ``ckpt`` (Megatron-LM's ``--load == --save``), then resume once more."""
    from lvx_megatron.training.loop import Trainer

    overrides = {"checkpoint.save": str(ckpt), **spec}
    with own_process_groups():
        trainer, error, out, err = _captured(lambda: Trainer(loaders.config(ckpt, **overrides)))
        if trainer is None:
            return {"error": error, "stdout": out, "stderr": err}
        try:
            _, error, run_out, run_err = _captured(trainer.run)
            final = _weights(trainer.state.stage)
        finally:
            trainer.close()
    again = loaders.train(ckpt)
    return {
        "error": error,
        "stdout": out + run_out,
        "stderr": err + run_err,
        "listing": sorted(p.name for p in ckpt.iterdir()),
        "tracker": (ckpt / TRACKER).read_text(),
        "reloaded_equal": again["output"] is not None and _same(again["output"], final),
        "reloaded_iteration": again["iteration"],
        "reloaded_stdout": again["stdout"],
    }


def _cli(loaders: Loaders, ckpt: Path, spec: dict) -> dict:
    """``pretrain_mllm.py``'s entry point in this process, resuming from and saving into ``ckpt``, with
    the overrides of ``spec`` and a disk that fills while ``spec["full_disk"]`` is written."""
    from lvx_megatron.training import main

    tree = yaml.safe_load(TINY.read_text())
    overrides = {"checkpoint.load": str(ckpt), "checkpoint.save": str(ckpt), **spec["overrides"]}
    for dotted, value in small_run(loaders.data, str(loaders.work / "run"), **overrides).items():
        section, key = dotted.rsplit(".", 1)
        target = tree
        for name in section.split("."):
            target = target.setdefault(name, {})
        target[key] = value
    config = loaders.work / "cli.yaml"
    config.write_text(yaml.safe_dump(tree))
    injected = full_disk(spec["full_disk"]) if "full_disk" in spec else contextlib.nullcontext()
    with injected, own_process_groups():
        _, error, out, err = _captured(main, ["--config", str(config)])
    return {
        "exit": error.code if isinstance(error, SystemExit) else repr(error),
        "stdout": out,
        "stderr": err,
        "listing": sorted(p.name for p in ckpt.iterdir()),
        "tracker": (ckpt / TRACKER).read_text(),
    }


def _older_save(ckpt: Path, iteration: int, saver) -> None:
    """Save ``saver``'s state as ``iteration`` the way saves did before checkpoints held the run config."""
    from lvx_megatron.training.checkpointing import _sharded_state, write_checkpoint

    sharded = _sharded_state(saver.state, is_loading=False)
    write_checkpoint(
        {**sharded, "scheduler": saver.state.scheduler.state_dict(), "iteration": iteration}, ckpt, iteration
    )


def _label(output: dict | None, references: dict[str, dict]) -> str | None:
    """Which reference ``output`` equals exactly ('different' for none, None for no output)."""
    if output is None:
        return None
    return next((name for name, ref in references.items() if _same(output, ref)), "different")


def _summary(outcome: dict, references: dict[str, dict]) -> dict:
    error = outcome.get("error")
    return {
        **{k: v for k, v in outcome.items() if k not in ("output", "error")},
        "error": None if error is None else (type(error).__name__, str(error)),
        "weights": _label(outcome.get("output"), references),
    }


def fault_matrix(rank: int, world_size: int, root: str, cases: list[dict]) -> dict:
    """Worker: trains the tiny model 4 iterations into ``root/base`` (checkpoints at 2 and 4), then runs
    every case of ``cases`` on its own copy of that folder (one process: spawning costs seconds).

    A case may damage files (``damage``), set the tracker (``tracker``), save the perturbed state as an
    older version did (``older_save``: its iteration), fault a save (``save``), resume training
    (``resume``), run the command line (``cli``), and give the trainer's loader config overrides
    (``overrides``) and the tools flags (``flags``).

    Returns ``{case id: result}``: for load cases, each loader's outcome (what it printed, its error, and
    which reference its output equals: ``iter_4`` (the intact newest), ``iter_2`` (the intact fallback) or
    ``saved`` (the perturbed state that the save cases write)); for save cases also the save's error and
    the folder afterwards.
    """
    from lvx_megatron.training.checkpointing import save_checkpoint

    base, work, data = Path(root) / "base", Path(root) / "work", str(Path(root) / "data")
    loaders = Loaders(data, work)
    run = small_run(data, str(work / "run"), **{"checkpoint.save": str(base), "checkpoint.save_interval": 2})
    with own_process_groups():
        run_trainers(rank, world_size, [run])

    def copy(name: str) -> Path:
        target = work / name
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(base, target)
        return target

    older = copy("ref_iter_2")
    shutil.rmtree(older / "iter_0000004")
    (older / TRACKER).write_text("2")
    saved = copy("ref_saved")
    with perturbed(loaders, base) as saver:
        save_checkpoint(saver.state, saver.cfg, 6, saved)
    which = ("train", "export", "forward")
    references = {name: {} for name in which}
    for label, folder in (("iter_4", base), ("iter_2", older), ("saved", saved)):
        outcomes = {
            "train": loaders.train(folder),
            "export": loaders.export(folder, work / f"export_{label}"),  # kept: the command-line test compares
            "forward": loaders.forward(folder),
        }
        for loader, outcome in outcomes.items():
            assert outcome["output"] is not None, (label, loader, outcome["stderr"])
            references[loader][label] = outcome["output"]
    for loader, refs in references.items():
        assert not _same(refs["iter_4"], refs["iter_2"]) and not _same(refs["iter_4"], refs["saved"]), loader
    # megatron's checkpoint writer runs a full garbage collection per save: spare it the long-lived objects.
    gc.collect()
    gc.freeze()

    results = {}
    for case in cases:
        ckpt = copy("case")
        for relative, fault in case.get("damage", []):
            damage(ckpt / relative, fault)
        if "tracker" in case:
            (ckpt / TRACKER).write_text(case["tracker"])
        result = {}
        try:
            if "resume" in case:
                result["resume"] = _summary(_resume(loaders, ckpt, case["resume"]), {})
            if "cli" in case:
                result["cli"] = _cli(loaders, ckpt, case["cli"])
            if "older_save" in case:
                with perturbed(loaders, base) as saver:
                    _older_save(ckpt, case["older_save"], saver)
            if "save" in case:
                keep_last = {"checkpoint.keep_last": case["save"].get("keep_last", 0)}
                with perturbed(loaders, base, **keep_last) as saver:
                    result["save"] = _summary(_save_fault(ckpt, case["save"], saver), {})
                    # The next save, on a copy of what the fault left (the loaders below see the original).
                    again = work / "case_resave"
                    shutil.rmtree(again, ignore_errors=True)
                    shutil.copytree(ckpt, again)
                    result["resave"] = _summary(_resave(again, case["save"]["iteration"], saver), {})
            for loader in case.get("loaders", which):
                if loader == "train":
                    outcome = loaders.train(ckpt, **case.get("overrides", {}))
                else:
                    outcome = getattr(loaders, loader)(ckpt, flags=tuple(case.get("flags", ())))
                result[loader] = _summary(outcome, references[loader])
        except BaseException:
            result["crash"] = traceback.format_exc()
        results[case["id"]] = result
    return results


def full_disk_on_rank(rank: int, world_size: int, root: str, failing_rank: int) -> dict:
    """Worker (tensor parallel over the world, so that every rank writes a shard file): save iteration 6
    of ``root/base``'s state into a copy of it while the disk fills as rank ``failing_rank`` writes its
    file; what this rank raised."""
    from lvx_megatron.training.checkpointing import load_checkpoint, save_checkpoint

    base, ckpt = Path(root) / "base", Path(root) / f"full_disk_world{world_size}"
    if rank == 0:
        shutil.rmtree(ckpt, ignore_errors=True)
        shutil.copytree(base, ckpt)
    loaders = Loaders(str(Path(root) / "data"), Path(root) / f"work_world{world_size}_rank{rank}")
    cfg = loaders.config(base, **{"parallel.tensor_model_parallel_size": world_size})
    state = loaders.state(cfg)
    load_checkpoint(state, cfg)
    failing = full_disk(f"__{failing_rank}_0.distcp") if rank == failing_rank else None
    with failing or contextlib.nullcontext():
        _, error, _, err = _captured(save_checkpoint, state, cfg, 6, ckpt)
    dist.barrier()
    return {
        "error": None if error is None else (type(error).__name__, str(error)),
        "stderr": err,
        "listing": sorted(p.name for p in ckpt.iterdir()),
        "tracker": (ckpt / TRACKER).read_text(),
    }
