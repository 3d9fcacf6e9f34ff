"""Write the synthetic video QA dataset as webdataset shards: ``DIR/train/`` and ``DIR/eval/``.

    python tools/make_video_qa.py --out data/video_qa --train 20000 --eval 1000 --frames 8 --frame-size 64 --seed 0

Train and eval samples come from disjoint random streams of the same seed (see lvx_megatron/data/video_qa.py).
Each folder gets ``shard-%06d.tar`` files and an ``index.json``; read them with
``lvx_megatron.data.ShardedVideoDataset``. Format: docs/data.md.
"""

import os
import sys

from lvx_megatron.data.shards import FRAME_FORMATS, write_shards
from lvx_megatron.data.video_qa import VideoQAGenerator
from lvx_megatron.data.video_qa_flags import write_splits, writer_parser


def main(argv: list[str] | None = None) -> None:
    """Parse the flags and write both splits."""
    out_help = "output folder (gets train/ and eval/ subfolders)"
    p = writer_parser(__doc__, out_help, "samples", train=20000, held_out=1000, frames=8, frame_size=64)
    p.add_argument("--seed", type=int, default=0, help="dataset seed (default 0)")
    p.add_argument("--samples-per-shard", type=int, default=1000, help="samples per tar shard (default 1000)")
    p.add_argument(
        "--image-format", choices=FRAME_FORMATS, default="png", help="frame encoding (default png, lossless)"
    )
    p.add_argument("--log-every", type=int, default=1000, help="progress line every N samples (default 1000)")
    args = p.parse_args(argv)

    def write(split: str, n: int, gen: VideoQAGenerator) -> None:
        out = os.path.join(args.out, split)
        print(
            f"{split}: {n} samples, {args.frames} frames of {args.frame_size}x{args.frame_size} -> {out}",
            file=sys.stderr,
        )
        write_shards(
            gen, out, samples_per_shard=args.samples_per_shard, image_format=args.image_format, log_every=args.log_every
        )

    write_splits(p, args, write, "tools/make_video_qa.py")


if __name__ == "__main__":
    main()
