"""Results files record where their numbers came from: commit, tree state, device, versions, command."""

import json
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from lvx_megatron import results

SHA = "0123456789abcdef0123456789abcdef01234567"


def test_results_file_names_commit_device_versions_and_a_rerunnable_command(tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("SOME_TOKEN", "secret")
    path = tmp_path / "sub" / "r.json"
    argv = ["--x", "1", "--label", "a b", "--output", str(path)]
    results.write_results(str(path), "tool.py", argv, {"dtype": "bf16"}, rows=[{"a": 1}])
    data = json.loads(path.read_text())
    assert data["rows"] == [{"a": 1}]
    meta = data["meta"]
    assert shlex.split(meta["command"]) == ["python", "tools/tool.py", *argv]
    assert meta["dtype"] == "bf16" and meta["device"] == "cpu" and meta["driver"] is None
    for key in ("torch", "cuda", "cudnn", "triton", "python", "date", "megatron_core"):
        assert key in meta
    assert meta["env"] == {"TRITON_INTERPRET": "1"}  # only the variables that change what runs
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=results.REPO, capture_output=True, text=True)
    assert meta["git"]["commit"] == head.stdout.strip()
    assert isinstance(meta["git"]["dirty"], bool)


def test_command_names_torchrun_when_started_by_it(monkeypatch):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert results.command_line("multi_gpu_check.py", ["--quick"]) == (
        "torchrun --nproc-per-node=8 tools/multi_gpu_check.py --quick"
    )


def _git(repo: Path, *args: str) -> None:
    subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(repo), *args], check=True, capture_output=True
    )


def test_dirty_tree_lists_changed_and_untracked_files(tmp_path):
    _git(tmp_path, "init", "-q")
    (tmp_path / "a.py").write_text("x = 1\n")
    _git(tmp_path, "add", "a.py")
    _git(tmp_path, "commit", "-q", "-m", "one")
    clean = results.git_state(tmp_path)
    assert clean["dirty"] is False and clean["changed"] == [] and len(clean["commit"]) == 40
    (tmp_path / "a.py").write_text("x = 2\n")
    (tmp_path / "new.py").write_text("")
    dirty = results.git_state(tmp_path)
    assert dirty["commit"] == clean["commit"] and dirty["dirty"] is True
    assert sorted(dirty["changed"]) == ["a.py", "new.py"]


def test_many_changed_files_are_listed_briefly(tmp_path):
    _git(tmp_path, "init", "-q")
    for i in range(results.MAX_LISTED_FILES + 5):
        (tmp_path / f"f{i}.txt").write_text("")
    changed = results.git_state(tmp_path)["changed"]
    assert len(changed) == results.MAX_LISTED_FILES + 1 and changed[-1] == "... and 5 more"


@pytest.fixture
def no_git(monkeypatch, tmp_path):
    """A PATH on which no git binary exists (as on a GPU machine without git)."""
    empty = tmp_path / "empty_bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))


def _fake_repo(root: Path, head: str, loose: dict[str, str] | None = None, packed: str | None = None) -> Path:
    git_dir = root / ".git"
    (git_dir / "refs" / "heads").mkdir(parents=True)
    (git_dir / "HEAD").write_text(head + "\n")
    for ref, sha in (loose or {}).items():
        (git_dir / ref).write_text(sha + "\n")
    if packed is not None:
        (git_dir / "packed-refs").write_text(packed)
    return root


def test_without_git_the_commit_is_read_from_loose_refs(tmp_path, no_git):
    repo = _fake_repo(tmp_path / "r", "ref: refs/heads/main", loose={"refs/heads/main": SHA})
    assert results.git_state(repo) == {"commit": SHA, "dirty": "unknown", "changed": "unknown"}


def test_without_git_the_commit_is_read_from_packed_refs_or_a_detached_head(tmp_path, no_git):
    packed = f"# pack-refs with: peeled fully-peeled sorted\n{'f' * 40} refs/heads/other\n{SHA} refs/heads/main\n"
    repo = _fake_repo(tmp_path / "packed", "ref: refs/heads/main", packed=packed)
    assert results.git_state(repo)["commit"] == SHA
    assert results.git_state(_fake_repo(tmp_path / "detached", SHA))["commit"] == SHA


def test_worktree_git_file_is_followed(tmp_path, no_git):
    main = _fake_repo(tmp_path / "main", "ref: refs/heads/main", loose={"refs/heads/feature": SHA})
    wt_dir = main / ".git" / "worktrees" / "wt"
    wt_dir.mkdir(parents=True)
    (wt_dir / "HEAD").write_text("ref: refs/heads/feature\n")
    (wt_dir / "commondir").write_text("../..\n")
    checkout = tmp_path / "wt"
    checkout.mkdir()
    (checkout / ".git").write_text(f"gitdir: {wt_dir}\n")
    assert results.git_state(checkout)["commit"] == SHA


def test_missing_or_unreadable_git_state_is_unknown_not_an_error(tmp_path, no_git):
    assert results.git_state(tmp_path)["commit"] == "unknown"
    dangling = _fake_repo(tmp_path / "dangling", "ref: refs/heads/gone")
    assert results.git_state(dangling)["commit"] == "unknown"
    garbage = _fake_repo(tmp_path / "garbage", "not a ref")
    assert results.git_state(garbage)["commit"] == "unknown"


@pytest.mark.parametrize(
    "name, slug",
    [
        ("NVIDIA H100 80GB HBM3", "h100"),
        ("NVIDIA H200", "h200"),
        ("NVIDIA A100-SXM4-80GB", "a100"),
        ("NVIDIA GeForce RTX 4090", "geforce-rtx-4090"),
        ("cpu", "cpu"),
    ],
)
def test_device_slug_names_results_files(name, slug):
    assert results.device_slug(name) == slug


def _committed_repo(path: Path) -> str:
    """A repository with one commit (and an ignored file); its commit hash."""
    _git(path, "init", "-q")
    (path / "a.py").write_text("x = 1\n")
    (path / ".gitignore").write_text("/.whl/\n")
    _git(path, "add", "-A")
    _git(path, "commit", "-q", "-m", "one")
    (path / ".whl").mkdir()
    (path / ".whl" / "w.whl").write_text("carried, ignored")
    return subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()


def test_a_given_source_commit_is_verified_by_the_copy_s_tree_hash(monkeypatch, tmp_path):
    """A copied tree's .git can be stale: the commit the copier names wins, and the copy counts as clean
    only when its files hash to that commit's tree (given, or found in the copy's .git)."""
    commit = _committed_repo(tmp_path)
    tree = subprocess.run(["git", "-C", str(tmp_path), "rev-parse", "HEAD^{tree}"], capture_output=True, text=True)
    tree = tree.stdout.strip()
    monkeypatch.setenv(results.SOURCE_COMMIT_ENV, commit)
    state = results.git_state(tmp_path)
    assert state["commit"] == commit and state["dirty"] is False and state["tree"] == tree, state
    assert state["tree_check"] == "verified" and state["source"] == "$LVX_SOURCE_COMMIT"

    other = "b" * 40  # a commit the copy's .git does not hold: its tree must be given
    monkeypatch.setenv(results.SOURCE_COMMIT_ENV, other)
    state = results.git_state(tmp_path)
    assert state["dirty"] == "unknown" and "set $LVX_SOURCE_TREE" in state["tree_check"], state
    monkeypatch.setenv(results.SOURCE_TREE_ENV, tree)
    state = results.git_state(tmp_path)
    assert state["commit"] == other and state["dirty"] is False and state["tree_check"] == "verified"

    (tmp_path / "a.py").write_text("x = 2\n")
    (tmp_path / "new.py").write_text("")
    state = results.git_state(tmp_path)
    assert state["dirty"] is True and sorted(state["changed"]) == ["a.py", "new.py"], state
    assert state["tree"] != tree and tree in state["tree_check"]
    assert (tmp_path / ".git" / "index").is_file()  # the repository's own index is untouched
    staged = subprocess.run(["git", "-C", str(tmp_path), "diff", "--cached", "--name-only"], capture_output=True)
    assert staged.stdout == b""

    (tmp_path / "a.py").write_text("x = 1\n")
    (tmp_path / "new.py").unlink()
    shutil.rmtree(tmp_path / ".git")  # a copy without its .git: the tree hash is still its files'
    clean = {**state, "dirty": False, "changed": [], "tree": tree, "tree_check": "verified"}
    assert results.git_state(tmp_path) == clean


def test_rows_table_formats_each_column_and_leaves_missing_values_empty():
    rows = [{"case": "a", "ms": 1.234, "share": 0.5}, {"case": "b", "ms": 10.0, "share": None}]
    table = results.rows_table(rows, [("case", ""), ("ms", ".1f"), ("share", ".0%")])
    assert table.splitlines() == ["| case | ms | share |", "|---|---|---|", "| a | 1.2 | 50% |", "| b | 10.0 |  |"]


def _committed_results() -> list[Path]:
    return sorted((results.REPO / "benchmarks" / "results").glob("*.json"))


@pytest.mark.parametrize("path", _committed_results(), ids=lambda p: p.name)
def test_every_committed_results_file_proves_its_commit(path):
    """A committed file names a commit of this history and says its tree was exactly that commit's:
    ``dirty: false`` with the tree hash (verified against ``$LVX_SOURCE_COMMIT`` on a GPU machine's copy)."""
    git = json.loads(path.read_text())["meta"].get("git", {})
    assert git.get("dirty") is False and git.get("tree"), (
        f"{path.name}: git {git}; regenerate it from a clean tree (docs/results.md) or remove it with its numbers"
    )
    known = subprocess.run(
        ["git", "-C", str(results.REPO), "merge-base", "--is-ancestor", git["commit"], "HEAD"], capture_output=True
    )
    assert known.returncode == 0, f"{path.name}: commit {git['commit']} is not in this history"
