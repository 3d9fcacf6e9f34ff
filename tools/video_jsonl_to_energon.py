"""Convert a folder of video clips + JSONL (the layout ``data.kind: video_jsonl`` reads) into an energon dataset.

    python tools/video_jsonl_to_energon.py --input data/video_clips_tiny --out data/video_energon_tiny

``INPUT/train.jsonl`` and ``INPUT/eval.jsonl`` (one line per clip: ``{"video": "clips/a.mp4", "question": ...,
"answer": ..., optional "start"/"end"/"fps"/"qtype"}``) become WebDataset tars in ``OUT/train/`` and
``OUT/val/`` (energon's eval split is ``val``), each sample the clip's bytes as they are plus a ``.json``
with its text and window; then ``energon prepare`` indexes them (non-interactively; the command is printed:
a user can re-run it) as a ``CrudeWebdataset``. Train on it with ``data.kind: energon``, ``data.path: OUT``.
Lines that cannot make a sample (invalid JSON, no question or answer, a missing clip, a clip outside ``INPUT``
unless ``--allow-outside-paths``) are skipped and named.
Format: docs/data.md ("Energon datasets").
"""

import argparse
import sys

from lvx_megatron.data.energon import write_energon_dataset


def main(argv: list[str] | None = None) -> None:
    """Parse the flags and convert both splits."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, help="folder with train.jsonl, eval.jsonl and the clips they name")
    p.add_argument("--out", required=True, help="output folder: the energon dataset (train/, val/, .nv-meta/)")
    p.add_argument("--samples-per-shard", type=int, default=1000, help="samples per tar file (default 1000)")
    p.add_argument("--log-every", type=int, default=1000, help="a progress line every this many samples (1000)")
    p.add_argument(
        "--allow-outside-paths",
        action="store_true",
        help="read clips outside --input (default: such lines are skipped)",
    )
    args = p.parse_args(argv)
    if args.samples_per_shard < 1:
        p.error(f"--samples-per-shard must be >= 1, got {args.samples_per_shard}")
    counts = write_energon_dataset(
        args.input, args.out, args.samples_per_shard, args.log_every, args.allow_outside_paths
    )
    skipped = sum(c["skipped"] for c in counts.values())
    print(
        f"energon dataset {args.out}: {counts['train']['samples']} train and {counts['eval']['samples']} eval "
        f"samples ({skipped} lines skipped); train with data.kind: energon, data.path: {args.out}",
        file=sys.stderr,
    )


if __name__ == "__main__":
    try:
        main()
    except (ValueError, OSError, RuntimeError) as e:
        sys.exit(f"error: {e}")
