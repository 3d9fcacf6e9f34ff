"""Convert a folder of images/frames plus a JSONL file into the video QA shard format.

    python tools/folder_to_wds.py --images DIR --texts samples.jsonl --out data/my_set

One JSONL line per sample, paths relative to ``--images``:

    {"frames": ["clip1/000.jpg", "clip1/001.jpg"], "question": "what happens?", "answer": "a dog jumps"}
    {"image": "a.png", "prompt": "describe the image", "response": "a red car"}

"question" may be spelled "prompt" and "answer" "response". All frames of a sample must have the same size.
PNG and JPEG files are stored byte for byte; other image formats are re-encoded as PNG. The output folder
gets ``shard-%06d.tar`` files and ``index.json`` (docs/data.md); read it with
``lvx_megatron.data.ShardedVideoDataset``.
"""

import argparse
import io
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path

from PIL import Image

from lvx_megatron.data.checks import PATH_CHARS, cut
from lvx_megatron.data.ownership import claim_output
from lvx_megatron.data.shards import sample_text_fields, write_shards

_KEEP = {".png": "png", ".jpg": "jpg", ".jpeg": "jpg"}


def _encoded_frame(path: str, where: str) -> tuple[str, bytes, tuple[int, int]]:
    """(ext, bytes, size) of one image file, checked to be a readable image."""
    if not os.path.isfile(path):
        raise ValueError(f"{where}: image file {cut(repr(path), PATH_CHARS)} not found")
    with open(path, "rb") as f:
        data = f.read()
    try:
        with Image.open(io.BytesIO(data)) as im:
            size = im.size
            ext = _KEEP.get(os.path.splitext(path)[1].lower())
            if ext is None:  # not png/jpg: re-encode losslessly
                buf = io.BytesIO()
                im.convert("RGB").save(buf, format="PNG")
                ext, data = "png", buf.getvalue()
    except OSError as e:
        raise ValueError(f"{where}: {cut(repr(path), PATH_CHARS)} is not a readable image ({e})") from None
    return ext, data, size


def iter_samples(images_dir: str, texts: str) -> Iterator[dict]:
    """Samples ``{"encoded_frames", "question", "answer"}`` of a JSONL file; errors name the line number."""
    with open(texts) as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{texts}:{lineno}"
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: invalid JSON ({e})") from None
            if not isinstance(rec, dict):
                raise ValueError(f"{where}: each line must be a JSON object")
            question, answer = sample_text_fields(rec, where)
            if "frames" in rec:
                paths = rec["frames"]
                if not isinstance(paths, list) or not paths or not all(isinstance(x, str) for x in paths):
                    raise ValueError(f"{where}: field 'frames' must be a non-empty list of file paths")
            elif "image" in rec:
                if not isinstance(rec["image"], str):
                    raise ValueError(f"{where}: field 'image' must be a file path")
                paths = [rec["image"]]
            else:
                raise ValueError(f"{where}: missing field 'frames' (list of paths) or 'image' (one path)")
            encoded, sizes = [], set()
            for rel in paths:
                ext, data, size = _encoded_frame(os.path.join(images_dir, rel), where)
                encoded.append((ext, data))
                sizes.add(size)
            if len(sizes) > 1:
                raise ValueError(f"{where}: frames differ in size {sorted(sizes)}; resize them to one size first")
            yield {"encoded_frames": encoded, "question": question, "answer": answer}


def main(argv: list[str] | None = None) -> None:
    """Parse the flags and convert."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", required=True, help="folder the JSONL image paths are relative to")
    p.add_argument("--texts", required=True, help="JSONL file, one sample per line")
    p.add_argument("--out", required=True, help="output shard folder")
    p.add_argument("--samples-per-shard", type=int, default=1000, help="samples per tar shard (default 1000)")
    p.add_argument("--prefix", default="shard", help="shard file name prefix (default 'shard')")
    p.add_argument("--log-every", type=int, default=1000, help="progress line every N samples (default 1000)")
    args = p.parse_args(argv)
    if not os.path.isdir(args.images):
        p.error(f"--images folder {args.images!r} does not exist")
    if not os.path.isfile(args.texts):
        p.error(f"--texts file {args.texts!r} does not exist")
    claim_output(Path(args.out), "tools/folder_to_wds.py")
    write_shards(
        iter_samples(args.images, args.texts),
        args.out,
        samples_per_shard=args.samples_per_shard,
        prefix=args.prefix,
        log_every=args.log_every,
    )


if __name__ == "__main__":
    try:
        main()
    except ValueError as e:
        sys.exit(f"error: {e}")
