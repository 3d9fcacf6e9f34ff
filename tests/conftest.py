import contextlib
import ctypes
import os
import sys
import time
from multiprocessing import forkserver, resource_tracker

import psutil
import pytest
import torch

# Without a GPU the Triton kernels run in Triton's CPU interpreter; the switch is read when a
# kernel is defined, so it must be set before lvx_megatron's kernels are first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

_PR_SET_CHILD_SUBREAPER = 36
_EXIT_GRACE_S = float(os.environ.get("LVX_TEST_EXIT_GRACE_S", "10"))  # how long a test's processes may take to end


def pytest_configure(config: pytest.Config) -> None:
    """Make pytest the subreaper of its process tree (Linux): a process whose parent dies first (a
    trainer's helper after the trainer was killed) is re-parented to pytest instead of init, so the
    check below still sees it."""
    if sys.platform == "linux":
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def _new_processes(before: set[int]) -> list[psutil.Process]:
    """Live descendants of pytest not in ``before``; collects the exit status of those that ended."""
    # pytest's own resource tracker: started by the first torch.multiprocessing spawn, shared by every
    # later one, it ends with pytest.
    tracker = getattr(resource_tracker._resource_tracker, "_pid", None)
    # and the fork server that lvx_megatron.launch.spawn_gloo's ranks fork from, likewise shared
    server = getattr(forkserver._forkserver, "_forkserver_pid", None)
    live = []
    for p in psutil.Process().children(recursive=True):
        if p.pid in before or p.pid in (tracker, server):
            continue
        try:
            if p.status() != psutil.STATUS_ZOMBIE:
                live.append(p)
            elif p.ppid() == os.getpid():  # an orphan re-parented to pytest: nobody else collects it
                os.waitpid(p.pid, os.WNOHANG)
        except (psutil.NoSuchProcess, ChildProcessError):
            pass
    return live


def _wait_for_new_processes(before: set[int], timeout_s: float) -> list[psutil.Process]:
    deadline = time.monotonic() + timeout_s
    while (live := _new_processes(before)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return live


def _describe(p: psutil.Process) -> str:
    try:
        return f"pid {p.pid}: {' '.join(p.cmdline())[:200] or p.name()}"
    except psutil.Error:
        return f"pid {p.pid}"


@pytest.fixture(autouse=True)
def no_process_left_behind():
    """Every process a test starts (and every process those start) must end with the test.

    Waits up to ``_EXIT_GRACE_S`` for them, then kills what is left and fails the test naming it.
    """
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    yield
    left = _wait_for_new_processes(before, _EXIT_GRACE_S)
    if left:
        described = [_describe(p) for p in left]
        for p in left:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
        _wait_for_new_processes(before, 5.0)  # and what only they kept alive (an orphaned resource tracker)
        pytest.fail(f"the test left {len(left)} process(es) running: {'; '.join(described)}", pytrace=False)


@pytest.fixture(autouse=True)
def environment_restored():
    """Each test leaves ``os.environ`` as it found it.

    A tool's ``main`` called in-process (``tools/generate.py``, ``tools/evaluate.py``) makes a world of
    one and sets ``RANK``/``MASTER_PORT`` for it, as a command should; later tests' subprocesses must
    not inherit them (they would join that port, still held by this process: EADDRINUSE).
    """
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)
