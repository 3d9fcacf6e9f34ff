"""Write the synthetic video QA dataset as webdataset shards: ``DIR/train/`` and ``DIR/eval/``.

    python tools/make_video_qa.py --out data/video_qa --train 20000 --eval 1000 --frames 8 --frame-size 64 --seed 0

Train and eval samples come from disjoint random streams of the same seed (see lvx_megatron/data/video_qa.py).
Each folder gets ``shard-%06d.tar`` files and an ``index.json``; read them with
``lvx_megatron.data.ShardedVideoDataset``. Format: docs/data.md.
"""

import argparse
import os
import sys

from lvx_megatron.data.shards import FRAME_FORMATS, write_shards
from lvx_megatron.data.video_qa import VideoQAGenerator, chance_accuracy


def main(argv: list[str] | None = None) -> None:
    """Parse the flags and write both splits."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output folder (gets train/ and eval/ subfolders)")
    p.add_argument("--train", type=int, default=20000, help="number of training samples (default 20000)")
    p.add_argument("--eval", type=int, default=1000, help="number of held-out eval samples (default 1000)")
    p.add_argument("--frames", type=int, default=8, help="frames per clip, >= 4 (default 8)")
    p.add_argument("--frame-size", type=int, default=64, help="frame height = width in pixels, >= 16 (default 64)")
    p.add_argument("--seed", type=int, default=0, help="dataset seed (default 0)")
    p.add_argument("--samples-per-shard", type=int, default=1000, help="samples per tar shard (default 1000)")
    p.add_argument(
        "--image-format", choices=FRAME_FORMATS, default="png", help="frame encoding (default png, lossless)"
    )
    p.add_argument("--log-every", type=int, default=1000, help="progress line every N samples (default 1000)")
    args = p.parse_args(argv)
    for split, n in (("train", args.train), ("eval", args.eval)):
        if n < 1:
            p.error(f"--{split} must be >= 1, got {n}")
        gen = VideoQAGenerator(n, num_frames=args.frames, frame_size=args.frame_size, seed=args.seed, split=split)
        out = os.path.join(args.out, split)
        print(
            f"{split}: {n} samples, {args.frames} frames of {args.frame_size}x{args.frame_size} -> {out}",
            file=sys.stderr,
        )
        write_shards(
            gen, out, samples_per_shard=args.samples_per_shard, image_format=args.image_format, log_every=args.log_every
        )
    print(f"chance accuracy (answers without the frames): {chance_accuracy():.4f}", file=sys.stderr)


if __name__ == "__main__":
    try:
        main()
    except ValueError as e:
        sys.exit(f"error: {e}")
