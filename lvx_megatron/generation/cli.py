"""What the generation tools' command lines share: flag parsers naming the flag, one error line, leaving the group."""

import argparse
import sys
from collections.abc import Callable

import torch.distributed as dist
from megatron.core import parallel_state


def positive_int(flag: str) -> Callable[[str], int]:
    """argparse type: an int >= 1, else an error naming ``flag``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = 0
        if value < 1:
            raise argparse.ArgumentTypeError(f"{flag} must be a positive integer, got {text!r}")
        return value

    return parse


def float_in(flag: str, low: float, high: float, low_open: bool) -> Callable[[str], float]:
    """argparse type: a float in ``[low, high]`` (``(low, high]`` when ``low_open``), else an error naming ``flag``."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = float("nan")
        inside = (value > low if low_open else value >= low) and value <= high
        if not inside:
            bounds = f"{'(' if low_open else '['}{low:g}, {high:g}]"
            raise argparse.ArgumentTypeError(f"{flag} must be a number in {bounds}, got {text!r}")
        return value

    return parse


def add_layout_flags(parser: argparse.ArgumentParser) -> None:
    """``--tensor-model-parallel-size`` and ``--context-parallel-size`` of the generation layout."""
    parser.add_argument(
        "--tensor-model-parallel-size", type=positive_int("--tensor-model-parallel-size"), help="default: the run's"
    )
    parser.add_argument(
        "--context-parallel-size",
        type=positive_int("--context-parallel-size"),
        help="default: the processes / the tensor-parallel size",
    )


def run_command(body: Callable[[], None]) -> int:
    """Run a tool's ``body``: 0 when it succeeds, 2 on a bad input (``ValueError``/``OSError``, config
    errors included) with one ``error:`` line on global rank 0. Afterwards megatron's model-parallel
    state is torn down and the process group the command joined is left (a caller's own stays)."""
    joined = dist.is_initialized()
    try:
        body()
    except (ValueError, OSError) as exc:
        if not dist.is_initialized() or dist.get_rank() == 0:
            print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        parallel_state.destroy_model_parallel()
        if not joined and dist.is_initialized():
            dist.destroy_process_group()
    return 0
