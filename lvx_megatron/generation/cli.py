"""What the tools' command lines share (generate, evaluate, mllama_forward, convert_hf_checkpoint): flag
parsers naming the flag, errors as one line through the launcher's path (exit status 2), leaving the group."""

import argparse
import sys
from collections.abc import Callable
from typing import NoReturn

import torch.distributed as dist
from megatron.core import parallel_state

from ..torchrun import report_error
from ..training.data import DataError


class ToolParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one ``error:`` line (no usage) through
    :func:`~lvx_megatron.torchrun.report_error`, exit status 2: under ``python -m lvx_megatron.torchrun``
    the launcher ends the run with it instead of torchrun's failure report. Its subparsers are ToolParsers too."""

    def error(self, message: str) -> NoReturn:
        report_error(f"error: {message}")
        sys.exit(2)


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


def non_blank(flag: str) -> Callable[[str], str]:
    """argparse type: a text with a character other than white space, else an error naming ``flag``."""

    def parse(text: str) -> str:
        if not text.strip():
            raise argparse.ArgumentTypeError(f"{flag} must not be empty or only white space, got {text!r}")
        return text

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


def run_command(body: Callable[[], None], write_errors: tuple[type[Exception], ...] = ()) -> int:
    """Run a tool's ``body``: 0 when it succeeds; 2 on a bad input (``ValueError``, ``OSError``, a data
    error; config errors included), 1 on one of ``write_errors`` (its output could not be written), with
    one ``error:`` line through :func:`~lvx_megatron.torchrun.report_error` (global rank 0 prints it; under
    ``python -m lvx_megatron.torchrun`` the launcher does, and exits with the status). Afterwards megatron's
    model-parallel state is torn down and the process group the command joined is left (a caller's own stays)."""
    joined = dist.is_initialized()
    try:
        body()
    except write_errors as exc:
        report_error(f"error: {exc}")
        return 1
    except (ValueError, OSError, DataError) as exc:
        report_error(f"error: {exc}")
        return 2
    finally:
        parallel_state.destroy_model_parallel()
        if not joined and dist.is_initialized():
            dist.destroy_process_group()
    return 0
