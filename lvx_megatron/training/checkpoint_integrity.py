"""Checkpoint integrity: a manifest of every file's size and CRC-32, verification, fallback, rotation.

After all ranks wrote a checkpoint, each rank checksums the files it wrote and rank 0 writes
``manifest.json`` (before the tracker file names the checkpoint). On load the files are checked
against it, spread over the ranks; a truncated or corrupted checkpoint (or manifest) is reported
and the newest older one that is intact is used instead. ``checkpoint.keep_last`` removes older
checkpoints.
"""

import json
import os
import re
import shutil
import zlib
from collections.abc import Callable
from pathlib import Path

import torch.distributed as dist

MANIFEST = "manifest.json"
_ITER_DIR = re.compile(r"^iter_(\d{7})$")


def _crc32(path: Path) -> int:
    crc = 0
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            crc = zlib.crc32(chunk, crc)
    return crc


def _mine(name: str, rank: int, world: int) -> bool:
    """The files this rank checksums: its own shard files, and the shared ones spread by name."""
    shard = re.match(r"^__(\d+)_\d+\.distcp$", name)
    owner = int(shard.group(1)) if shard else zlib.crc32(name.encode())
    return owner % world == rank


def on_rank0(action: Callable[[], None]) -> None:
    """Run ``action`` on rank 0 and raise its exception on every rank (collective).

    A file operation that fails on rank 0 alone (a full disk) must not leave the other ranks
    waiting in the next collective: they all raise it together.
    """
    error = None
    if dist.get_rank() == 0:
        try:
            action()
        except Exception as exc:
            error = exc
    errors = [error]
    dist.broadcast_object_list(errors, src=0)
    if errors[0] is not None:
        raise errors[0]


def write_atomically(path: Path, text: str) -> None:
    """Replace ``path`` by a file holding ``text``: written and synced under a temporary name, then renamed,
    so a reader sees the old file or the new one, never a partial one."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with tmp.open("w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _gather_checksums(path: Path, names: list[str]) -> dict[str, list[int]]:
    rank, world = dist.get_rank(), dist.get_world_size()
    mine = {n: [(path / n).stat().st_size, _crc32(path / n)] for n in names if _mine(n, rank, world)}
    parts = [None] * world
    dist.all_gather_object(parts, mine)
    return {name: entry for part in parts for name, entry in part.items()}


def write_manifest(path: Path) -> None:
    """Checksum every file of the checkpoint at ``path`` and write its manifest (collective)."""
    names = sorted(p.name for p in path.iterdir() if p.is_file() and p.name != MANIFEST)
    files = _gather_checksums(path, names)
    on_rank0(lambda: write_atomically(path / MANIFEST, json.dumps({"files": files}, indent=1, sort_keys=True)))


def _read_manifest(path: Path) -> tuple[dict[str, list[int]] | None, str]:
    """The manifest's ``{file: [size, crc32]}``, or None and why it cannot be used."""
    try:
        files = json.loads((path / MANIFEST).read_bytes())["files"]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
        return None, f"{MANIFEST} is unreadable or not valid JSON (truncated or corrupted?): {type(exc).__name__}"
    valid = isinstance(files, dict) and all(
        isinstance(entry, list) and len(entry) == 2 and all(type(v) is int for v in entry) for entry in files.values()
    )
    if not valid or not files:
        return None, f"{MANIFEST} does not list files as {{name: [size, crc32]}} (corrupted?)"
    return files, ""


def verify(path: Path) -> str | None:
    """None if the checkpoint at ``path`` matches its manifest, else what is wrong (collective).

    A checkpoint without a manifest (written before manifests existed) is not checked; the caller says so.
    """
    if not (path / MANIFEST).is_file():
        return None
    expected, problem = _read_manifest(path)
    rank, world = dist.get_rank(), dist.get_world_size()
    for name in sorted(expected or {}):
        if not _mine(name, rank, world):
            continue
        file = path / name
        size, crc = expected[name]
        if not file.is_file():
            problem = f"{name} is missing"
        elif file.stat().st_size != size:
            problem = f"{name} has {file.stat().st_size} bytes, the manifest says {size} (truncated?)"
        elif _crc32(file) != crc:
            problem = f"{name} fails its CRC-32 check against {MANIFEST} (corrupted)"
        if problem:
            break
    problems = [None] * world
    dist.all_gather_object(problems, problem)
    found = [p for p in problems if p]
    return found[0] if found else None


def complete_iterations(root: Path) -> list[int]:
    """Iterations under ``root`` whose checkpoint finished writing (has a manifest), newest first."""
    found = []
    for child in root.iterdir() if root.is_dir() else []:
        match = _ITER_DIR.match(child.name)
        if match and (child / MANIFEST).is_file():
            found.append(int(match.group(1)))
    return sorted(found, reverse=True)


def rotate(root: Path, keep_last: int, current: int) -> list[Path]:
    """Delete complete checkpoints older than the newest ``keep_last`` (rank 0 only; 0 keeps all).

    Folders newer than ``current`` are left alone and not counted: they are not this run's (a run that
    was set back, or a stale tracker), and the run replaces each one when it saves that iteration again.
    """
    if keep_last <= 0 or dist.get_rank() != 0:
        return []
    removed = []
    for iteration in [i for i in complete_iterations(root) if i <= current][keep_last:]:
        path = root / f"iter_{iteration:07d}"
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed
