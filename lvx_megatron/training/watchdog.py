"""Turn a hang into an error: a phase of the training loop that makes no progress for too long.

A collective that never completes (a rank died, a rank is stuck reading data, a network fault)
blocks every other rank forever. The loop marks its phases (``with watchdog.phase("forward-backward")``);
a background thread aborts the process when one phase has run longer than the timeout, after
printing the rank, the phase, the iteration and every thread's stack (the stack shows which
collective is waiting). Its child processes (megatron-core's checkpoint-writer manager, data
workers) are killed first: the abort skips the exit handlers that would stop them.
"""

import contextlib
import faulthandler
import os
import sys
import threading
import time

import psutil

HANG_EXIT_CODE = 3


def _kill_descendants() -> None:
    """Kill this process's child processes and theirs, which would outlive it as orphans."""
    for child in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.NoSuchProcess):
            child.kill()


class HangWatchdog:
    """Abort the process when a marked phase exceeds ``timeout_s`` seconds (0 disables)."""

    def __init__(self, timeout_s: float, rank: int, poll_s: float = 1.0) -> None:
        self.timeout_s, self.rank, self.poll_s = timeout_s, rank, poll_s
        self.iteration = 0
        self._phase: tuple[str, float] | None = None
        self._stop = threading.Event()
        self._thread = None
        if timeout_s > 0:
            self._thread = threading.Thread(target=self._watch, name="lvx-hang-watchdog", daemon=True)
            self._thread.start()

    @contextlib.contextmanager
    def phase(self, name: str):
        self._phase = (name, time.monotonic())
        try:
            yield
        finally:
            self._phase = None

    def _watch(self) -> None:
        while not self._stop.wait(self.poll_s):
            current = self._phase
            if current is None:
                continue
            name, started = current
            waited = time.monotonic() - started
            if waited > self.timeout_s:
                print(
                    f"hang: rank {self.rank}: '{name}' at iteration {self.iteration} made no progress for "
                    f"{waited:.0f} s (training.hang_timeout_s = {self.timeout_s:g}); a collective is probably "
                    "waiting for a rank that died or hangs. Stacks of this rank follow; aborting.",
                    file=sys.stderr,
                    flush=True,
                )
                faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
                sys.stderr.flush()
                _kill_descendants()
                os._exit(HANG_EXIT_CODE)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
