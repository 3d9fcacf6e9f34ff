"""Write the synthetic video QA dataset as mp4 clips plus JSONL: the layout ``data.kind: video_jsonl`` reads.

    python tools/make_video_clips.py --out data/video_clips --train 2048 --eval 256 --frames 4 --frame-size 32

``OUT/train.jsonl`` and ``OUT/eval.jsonl`` get one line per clip,
``{"video": "clips/train-000000.mp4", "question": ..., "answer": ..., "qtype": ...}``, and
``OUT/clips/`` the clips: ``--frames`` frames at ``--fps``, lossless H.264 (they decode to exactly the
generator's frames). The answers count frames, so train with ``data.max_images`` = ``--frames``
(uniform sampling then takes every frame). Format: docs/data.md.
"""

import json
import os
import sys

from lvx_megatron.data.video import SPLIT_FILES, write_clip
from lvx_megatron.data.video_qa import VideoQAGenerator
from lvx_megatron.data.video_qa_flags import write_splits, writer_parser


def write_split(out: str, split: str, gen: VideoQAGenerator, fps: int) -> None:
    """Clips of ``gen`` under ``out/clips`` and their JSONL; the JSONL is written last, atomically."""
    os.makedirs(os.path.join(out, "clips"), exist_ok=True)
    lines = []
    for i, sample in enumerate(gen):
        clip = f"clips/{split}-{i:06d}.mp4"
        write_clip(os.path.join(out, clip), sample["frames"], fps)
        record = {"video": clip, "question": sample["question"], "answer": sample["answer"], "qtype": sample["qtype"]}
        lines.append(json.dumps(record) + "\n")
    path = os.path.join(out, SPLIT_FILES[split])
    with open(f"{path}.tmp", "w") as f:
        f.writelines(lines)
    os.replace(f"{path}.tmp", path)


def main(argv: list[str] | None = None) -> None:
    """Parse the flags and write both splits."""
    out_help = "output folder (gets train.jsonl, eval.jsonl, clips/)"
    p = writer_parser(__doc__, out_help, "clips", train=2048, held_out=256, frames=4, frame_size=32)
    p.add_argument("--fps", type=int, default=4, help="frame rate of the clips (default 4)")
    p.add_argument("--seed", type=int, default=0, help="dataset seed (default 0)")
    args = p.parse_args(argv)
    if args.fps < 1:
        p.error(f"--fps must be >= 1, got {args.fps}")

    def write(split: str, n: int, gen: VideoQAGenerator) -> None:
        print(
            f"{split}: {n} clips of {args.frames} frames, {args.frame_size}x{args.frame_size} -> {args.out}",
            file=sys.stderr,
        )
        write_split(args.out, split, gen, args.fps)

    write_splits(p, args, write, "tools/make_video_clips.py")


if __name__ == "__main__":
    main()
