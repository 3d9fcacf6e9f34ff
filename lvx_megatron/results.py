"""The JSON results file every tool writes: the data plus where it came from.

``meta`` records what is needed to tell which code, software and machine produced the numbers and
how to produce them again: the git commit and whether the tree differed from it (and which
files), the device and its driver, the torch / CUDA / cuDNN / Triton / Python versions, the
date, and the command line as run (``shlex``-quoted, so it can be pasted back into a shell).
"""

import datetime
import importlib.metadata
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]  # the checkout this package runs from
MAX_LISTED_FILES = 20  # a dirty tree lists this many changed paths, then how many more
# Environment variables that change what the tools run (kernels, devices, allocator); nothing else
# from the environment is recorded.
RECORDED_ENV = ("CUDA_VISIBLE_DEVICES", "PYTORCH_CUDA_ALLOC_CONF")
RECORDED_ENV_PREFIXES = ("TRITON_", "LVX_")
# torch is imported by the functions that ask it: tools/regenerate_gpu_results.py names a given
# device (device_slug) through this module in a child process that should not take seconds to start.


def _triton_version() -> str | None:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


def _package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git(repo: Path, *args: str, env: dict[str, str] | None = None) -> str:
    # safe.directory: the GPU machine's copy of the tree may belong to another user than the one
    # running the tool, and git then refuses to read it.
    proc = subprocess.run(
        ["git", "-c", f"safe.directory={repo}", "-C", str(repo), *args],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
        env=env,
    )
    return proc.stdout


def _git_dir(repo: Path) -> Path | None:
    """The repository's git directory: ``.git``, or where a ``.git`` file (worktree) points."""
    dot_git = repo / ".git"
    if dot_git.is_dir():
        return dot_git
    if dot_git.is_file():
        text = dot_git.read_text().strip()
        if text.startswith("gitdir:"):
            path = Path(text.removeprefix("gitdir:").strip())
            return path if path.is_absolute() else (repo / path).resolve()
    return None


def commit_from_files(repo: Path) -> str:
    """HEAD's commit read from ``.git/HEAD`` and the refs (loose or packed), without git; "unknown"."""
    git_dir = _git_dir(repo)
    if git_dir is None or not (git_dir / "HEAD").is_file():
        return "unknown"
    head = (git_dir / "HEAD").read_text().strip()
    if not head.startswith("ref:"):
        return head if re.fullmatch(r"[0-9a-f]{40}([0-9a-f]{24})?", head) else "unknown"
    ref = head.removeprefix("ref:").strip()
    common = git_dir
    if (git_dir / "commondir").is_file():  # a worktree keeps its branches in the main repository
        common = (git_dir / (git_dir / "commondir").read_text().strip()).resolve()
    for base in dict.fromkeys((git_dir, common)):
        loose = base / ref
        if loose.is_file():
            return loose.read_text().strip()
        packed = base / "packed-refs"
        if packed.is_file():
            for line in packed.read_text().splitlines():
                sha, _, name = line.partition(" ")
                if name == ref:
                    return sha
    return "unknown"


# The commit of the tree being measured, given by whoever copied the tree to the machine: the GPU
# machine's copy can carry a stale ``.git`` (seen: the session's starting commit, with every later
# change "dirty"), so its own git state would name the wrong code. Its tree hash (``git rev-parse
# COMMIT^{tree}`` where the commit is) proves the copy is that commit; without it the copy's own
# ``.git`` must hold the commit.
SOURCE_COMMIT_ENV = "LVX_SOURCE_COMMIT"
SOURCE_TREE_ENV = "LVX_SOURCE_TREE"


def tree_hash(repo: Path = REPO) -> str:
    """The git tree hash of ``repo``'s files as they are (tracked and untracked, ignored ones left out).

    Written through a temporary index (and, for a copy without ``.git``, a temporary repository), so
    the repository's own index is untouched; equal to ``git rev-parse COMMIT^{tree}`` exactly when the
    files are that commit's.
    """
    with tempfile.TemporaryDirectory(prefix="lvx-index-") as tmp:
        env = {**os.environ, "GIT_INDEX_FILE": str(Path(tmp) / "index")}
        if _git_dir(repo) is None:
            env.update(GIT_DIR=str(Path(tmp) / "git"), GIT_WORK_TREE=str(repo))
            subprocess.run(["git", "init", "-q"], env=env, capture_output=True, check=True, timeout=60)
        _git(repo, "add", "-A", env=env)
        return _git(repo, "write-tree", env=env).strip()


def _verified_source(repo: Path, commit: str) -> dict:
    """The git state of a copy said to be ``commit``: ``dirty`` False only when its tree hash is the commit's."""
    state = {"commit": commit, "source": f"${SOURCE_COMMIT_ENV}"}
    expected = os.environ.get(SOURCE_TREE_ENV)
    try:
        actual = tree_hash(repo)
    except (OSError, subprocess.SubprocessError) as exc:
        return {**state, "dirty": "unknown", "changed": "unknown", "tree_check": f"no tree hash: {exc}"}
    if not expected:
        try:
            expected = _git(repo, "rev-parse", f"{commit}^{{tree}}").strip()
        except (OSError, subprocess.SubprocessError):
            return {
                **state,
                "dirty": "unknown",
                "changed": "unknown",
                "tree": actual,
                "tree_check": f"the copy's .git lacks {commit}; set ${SOURCE_TREE_ENV} to its tree hash",
            }
    if actual == expected:
        return {**state, "dirty": False, "changed": [], "tree": actual, "tree_check": "verified"}
    try:
        changed = _git(repo, "diff-tree", "-r", "--name-only", expected, actual).split()
    except (OSError, subprocess.SubprocessError):  # the expected tree's objects are not in this copy
        changed = "unknown"
    if isinstance(changed, list) and len(changed) > MAX_LISTED_FILES:
        changed = [*changed[:MAX_LISTED_FILES], f"... and {len(changed) - MAX_LISTED_FILES} more"]
    return {
        **state,
        "dirty": True,
        "changed": changed,
        "tree": actual,
        "tree_check": f"the copy's tree {actual} is not the commit's {expected}",
    }


def git_state(repo: Path = REPO) -> dict:
    """``commit``, ``dirty`` and the ``changed`` paths (untracked ones included) of ``repo``.

    With ``$LVX_SOURCE_COMMIT`` set the commit is that one (``source`` says so), and ``dirty`` is
    False only when the copy's tree hash (``tree``) equals the commit's (``$LVX_SOURCE_TREE``, or
    the commit's tree in the copy's ``.git``); ``tree_check`` says how that went.

    Without a working git (not installed, or no repository) the commit is read from the files of
    ``.git`` and ``dirty`` is "unknown": telling changed files from committed ones needs git.
    """
    given = os.environ.get(SOURCE_COMMIT_ENV)
    if given:
        return _verified_source(repo, given)
    try:
        status = _git(repo, "status", "--porcelain=v1", "--untracked-files=normal")
    except (OSError, subprocess.SubprocessError):
        return {"commit": commit_from_files(repo), "dirty": "unknown", "changed": "unknown"}
    try:
        commit = _git(repo, "rev-parse", "HEAD").strip()
    except subprocess.SubprocessError:  # a repository without commits
        commit = "unknown"
    changed = [line[3:] for line in status.splitlines() if line.strip()]
    listed = changed[:MAX_LISTED_FILES]
    if len(changed) > len(listed):
        listed.append(f"... and {len(changed) - len(listed)} more")
    return {"commit": commit, "dirty": bool(changed), "changed": listed, "tree": tree_hash(repo)}


def driver_version() -> str | None:
    """The NVIDIA driver version; None without CUDA, "unknown" when no source answers."""
    import torch

    if not torch.cuda.is_available():
        return None
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        ).stdout.split()
        if out:
            return out[0]
    except (OSError, subprocess.SubprocessError):
        pass
    proc_file = Path("/proc/driver/nvidia/version")
    if proc_file.is_file():
        found = re.search(r"Kernel Module\s+(?:for \S+\s+)?([0-9][0-9.]+)", proc_file.read_text())
        if found:
            return found.group(1)
    return "unknown"


def device_name() -> str:
    """This machine's GPU name, or "cpu"."""
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def device_slug(name: str | None = None) -> str:
    """A short file-name form of a device name: "NVIDIA H100 80GB HBM3" -> "h100", "cpu" -> "cpu"."""
    name = (name or device_name()).lower().removeprefix("nvidia ")
    model = re.search(r"\b([a-z]{1,2}\d{2,4}[a-z]?)\b", name)
    if model:
        return model.group(1)
    return re.sub(r"[^a-z0-9]+", "-", name).strip("-") or "unknown"


def command_line(tool: str, argv: list[str] | None) -> str:
    """The command as run, quoted for a POSIX shell; under torchrun, the launcher too."""
    words = ["python", f"tools/{tool}", *(argv if argv is not None else sys.argv[1:])]
    if "LOCAL_WORLD_SIZE" in os.environ:  # started by torchrun: one node's process count
        words = ["torchrun", f"--nproc-per-node={os.environ['LOCAL_WORLD_SIZE']}", *words[1:]]
    return shlex.join(words)


def provenance(tool: str, argv: list[str] | None) -> dict:
    """The ``meta`` fields every results file starts with."""
    import torch

    env = {k: v for k, v in sorted(os.environ.items()) if k in RECORDED_ENV or k.startswith(RECORDED_ENV_PREFIXES)}
    return {
        "device": device_name(),
        "driver": driver_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "triton": _triton_version(),
        "megatron_core": _package_version("megatron-core"),
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": command_line(tool, argv),
        "env": env,
        "git": git_state(),
    }


def write_results(path: str, tool: str, argv: list[str] | None, extra_meta: dict, **data) -> None:
    """Write ``{"meta": ..., **data}`` to ``path``; ``argv`` None means this process's ``sys.argv``."""
    meta = {**provenance(tool, argv), **extra_meta}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        json.dump({"meta": meta, **data}, f, indent=1)
        f.write("\n")


def rows_table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    """A markdown table of ``rows``: one column per ``(key, format spec)``, headed by the key; a
    missing or None value is left empty, ``%`` specs show fractions as percentages."""
    lines = ["| " + " | ".join(key for key, _ in columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = ["" if row.get(key) is None else format(row[key], spec) for key, spec in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
