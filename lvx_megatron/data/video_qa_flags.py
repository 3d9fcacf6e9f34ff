"""The command-line flags of the generated video QA set and the loop over its splits, shared by the
tools that write it (tools/make_video_qa.py as shards, tools/make_video_clips.py as clips)."""

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from lvx_megatron.data.ownership import claim_output
from lvx_megatron.data.video_qa import VideoQAGenerator, chance_accuracy


def writer_parser(
    doc: str, out_help: str, unit: str, train: int, held_out: int, frames: int, frame_size: int
) -> argparse.ArgumentParser:
    """A parser described by the tool's ``doc`` with ``--out``, ``--train``, ``--eval`` (counts of ``unit``),
    ``--frames`` and ``--frame-size`` (these defaults); the tool adds ``--seed`` and its own flags."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help=out_help)
    parser.add_argument("--train", type=int, default=train, help=f"number of training {unit} (default {train})")
    parser.add_argument(
        "--eval", type=int, default=held_out, help=f"number of held-out eval {unit} (default {held_out})"
    )
    parser.add_argument("--frames", type=int, default=frames, help=f"frames per clip, >= 4 (default {frames})")
    parser.add_argument(
        "--frame-size",
        type=int,
        default=frame_size,
        help=f"frame height = width in pixels, >= 16 (default {frame_size})",
    )
    return parser


def write_splits(
    parser: argparse.ArgumentParser,
    args: argparse.Namespace,
    write: Callable[[str, int, VideoQAGenerator], None],
    tool: str,
) -> None:
    """``write(split, count, generator)`` for train then eval as the flags (and ``--seed``) say, then the
    chance accuracy on stderr; ``--out`` is claimed for ``tool`` first (a folder another tool or the user
    wrote is refused). A count below 1 is a usage error; a ValueError (a refused ``--out``, a frame count
    or size the generator refuses, from ``write`` too) ends the process with its one line."""
    counts = (("train", args.train), ("eval", args.eval))
    for split, n in counts:
        if n < 1:
            parser.error(f"--{split} must be >= 1, got {n}")
    try:
        claim_output(Path(args.out), tool)
        for split, n in counts:
            gen = VideoQAGenerator(n, num_frames=args.frames, frame_size=args.frame_size, seed=args.seed, split=split)
            write(split, n, gen)
    except ValueError as e:
        sys.exit(f"error: {e}")
    print(f"chance accuracy (answers without the frames): {chance_accuracy():.4f}", file=sys.stderr)
