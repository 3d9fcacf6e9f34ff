"""Spawn a group of local processes joined over gloo (CPU demos and tests)."""

import os
import tempfile
from collections.abc import Callable
from multiprocessing import reduction
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

# Ranks fork from one server process that imported these once (a spawned rank spends seconds
# importing them again); the server runs no torch op, so no thread pool is forked with it.
PRELOAD = ("torch", "torch.distributed", "megatron.core")


class _CallerFd:
    """One of the caller's file descriptors, duplicated into a rank as it starts: forked from the
    server, a rank would otherwise write to the server's stdout/stderr, not the caller's now."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def __reduce__(self):
        return _adopt, (reduction.DupFd(self.fd),)


def _adopt(duplicate) -> int:
    return duplicate.detach()


def _worker(
    rank: int,
    world_size: int,
    init_file: str,
    fn: Callable[..., Any],
    args: tuple,
    result_dir: str,
    environ: dict[str, str],
    outputs: tuple[int, int],
) -> None:
    # The server's environment and output are those it started with: take the caller's of this call.
    os.environ.clear()
    os.environ.update(environ)
    for fd, target in zip(outputs, (1, 2), strict=True):
        os.dup2(fd, target)
        os.close(fd)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        result = fn(rank, world_size, *args)
        torch.save(result, os.path.join(result_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def spawn_gloo(world_size: int, fn: Callable[..., Any], *args: Any) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` processes joined over gloo.

    ``fn`` must be importable (a module-level function). Returns the per-rank return values;
    an exception in any rank is raised here with that rank's traceback.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    with tempfile.TemporaryDirectory(prefix="lvx_gloo_") as tmp:
        init_file = os.path.join(tmp, "init")
        mp.get_context("forkserver").set_forkserver_preload(list(PRELOAD))
        mp.start_processes(
            _worker,
            args=(world_size, init_file, fn, args, tmp, dict(os.environ), (_CallerFd(1), _CallerFd(2))),
            nprocs=world_size,
            join=True,
            start_method="forkserver",
        )
        return [torch.load(os.path.join(tmp, f"rank{r}.pt"), weights_only=False) for r in range(world_size)]
