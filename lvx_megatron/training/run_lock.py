"""One run per output folder: a lock file in ``checkpoint.save`` (else ``logging.run_dir``) for the run's lifetime.

Rank 0 creates ``run.lock`` atomically (written under a temporary name, then hard-linked into place, which
fails when the file exists) with its host, pid and Slurm job, and removes it when the run ends. A second
run on the folder stops at its start with one line naming the holder. A lock whose holder is gone (the
same host and that pid no longer runs, or an earlier allocation of the same Slurm job: a requeue after a
node failure) is taken over, and that is said. The holder of a lock from another host cannot be checked:
the message names it, to be removed by hand once that run has ended.
"""

import json
import os
import socket
import time
from pathlib import Path

import torch.distributed as dist

from .config import ConfigError, RunConfig

LOCK = "run.lock"


def _me() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "slurm_job": os.environ.get("SLURM_JOB_ID")}


def _read(path: Path) -> dict:
    """The holder a lock file names ({} when it is unreadable: a hand-made or damaged file)."""
    try:
        holder = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


def _gone(holder: dict) -> bool:
    """Whether the process that holds a lock has certainly ended."""
    me = _me()
    if holder.get("slurm_job") and holder.get("slurm_job") == me["slurm_job"]:
        return True  # this job's earlier allocation: Slurm requeued the job after its processes ended
    if holder.get("host") != me["host"] or not isinstance(holder.get("pid"), int):
        return False
    if holder["pid"] == me["pid"]:
        return True  # a run of this very process that did not release it
    try:
        os.kill(holder["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def _describe(holder: dict) -> str:
    started = holder.get("started")
    since = f", started {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(started))}" if started else ""
    return f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')}{since}"


class RunLock:
    """The claim of one run on ``folder`` (named ``setting`` in messages); :meth:`acquire`, then :meth:`release`."""

    def __init__(self, folder: str | Path, setting: str) -> None:
        self.folder, self.setting = Path(folder), setting
        self.path = self.folder / LOCK
        self.held = False

    def _create(self) -> bool:
        """Create the lock file naming this process; False when one exists."""
        tmp = self.path.with_name(f"{LOCK}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({**_me(), "started": time.time()}))
        try:
            os.link(tmp, self.path)  # atomic, and the file is complete when it appears
            return True
        except FileExistsError:
            return False
        finally:
            tmp.unlink(missing_ok=True)

    def acquire(self) -> str | None:
        """Take the lock; a note when a stale one was taken over. ConfigError naming the holder when held,
        or the folder when the lock file cannot be written there."""
        try:
            return self._acquire()
        except OSError as exc:
            raise ConfigError(f"config error: {self.setting}: cannot create {self.path}: {exc}") from None

    def _acquire(self) -> str | None:
        self.folder.mkdir(parents=True, exist_ok=True)
        note = None
        if not self._create():
            holder = _read(self.path)
            if not _gone(holder):
                raise ConfigError(
                    f"config error: {self.setting}: {self.folder} is in use by another run ({_describe(holder)}); "
                    f"one run per folder: stop that run or choose another {self.setting} (if it has ended, delete "
                    f"{self.path})"
                )
            self.path.unlink(missing_ok=True)
            if not self._create():  # another run took it over first
                raise ConfigError(
                    f"config error: {self.setting}: {self.folder} is in use by another run "
                    f"({_describe(_read(self.path))}); choose another {self.setting}"
                )
            note = f"{self.setting}: took over the stale {self.path} of {_describe(holder)} (that process has ended)"
        self.held = True
        return note

    def release(self) -> None:
        """Remove the lock file if this process holds it."""
        if self.held and _read(self.path).get("pid") == os.getpid():
            self.path.unlink(missing_ok=True)
        self.held = False


def lock_output_dir(cfg: RunConfig) -> RunLock:
    """Rank 0 locks the run's output folder (collective: every rank raises the same ConfigError when it is
    held); a takeover of a stale lock is printed."""
    setting = "checkpoint.save" if cfg.checkpoint.save else "logging.run_dir"
    lock = RunLock(cfg.output_dir, setting)
    outcome: list = [None]
    if dist.get_rank() == 0:
        try:
            outcome = [("note", lock.acquire())]
        except ConfigError as exc:
            outcome = [("error", str(exc))]
    dist.broadcast_object_list(outcome, src=0)
    kind, text = outcome[0]
    if kind == "error":
        raise ConfigError(text)
    if text and dist.get_rank() == 0:
        print(text, flush=True)
    return lock
