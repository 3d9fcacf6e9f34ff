"""Decode throughput of ``data.kind: video_jsonl`` clips on this machine's CPU: clips/s and frames/s of decode_clip.

    python tools/bench_video_decode.py --output benchmarks/results/video_decode_cpu.json

Encodes one test clip per resolution (``--seconds`` of moving gradients plus noise at 30 fps, H.264
yuv420p at crf 23 with a keyframe every 250 frames: typical of downloaded video QA sets), then times
``decode_clip`` in one thread, as ``BatchSource``'s worker runs it, for uniform sampling of 8, 32 and
64 frames over the whole clip and of 8 frames from a 10 s window in its middle; and, for scale, plain
PyAV decoding every frame (``all frames``). ``sampled_fps`` counts the frames a sample gets,
``decoded_fps`` (``all frames`` only) every frame the decoder produced.
"""

import argparse
import os
import tempfile
import time

import av
import numpy as np

from lvx_megatron.data.video import decode_clip
from lvx_megatron.results import write_results

RATE = 30
CASES = {  # name -> (frames asked, window start, window end: None = the clip's)
    "uniform 8": (8, 0.0, None),
    "uniform 32": (32, 0.0, None),
    "uniform 64": (64, 0.0, None),
    "window 10 s, 8": (8, None, None),
}


def encode_test_clip(path: str, width: int, height: int, seconds: int) -> None:
    """A clip that compresses like camera video: smooth moving content, a little noise."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    with av.open(path, "w") as container:
        stream = container.add_stream("libx264", rate=RATE)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"crf": "23", "preset": "veryfast", "g": "250"}
        for t in range(seconds * RATE):
            phase = t / RATE
            img = np.stack(
                [128 + 100 * np.sin(xx / 40 + phase), 128 + 100 * np.cos(yy / 30 - phase), (xx + yy + 8 * t) % 256],
                axis=-1,
            )
            img += rng.normal(0, 4, img.shape)
            frame = av.VideoFrame.from_ndarray(np.clip(img, 0, 255).astype(np.uint8), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())


def _decode_all(path: str) -> int:
    with av.open(path) as container:
        return sum(1 for _ in container.decode(video=0))


def _median_time(repeats: int, run, *args):
    """(median seconds of ``repeats`` calls ``run(*args)``, what the last call returned)."""
    times = []
    for _ in range(repeats):
        begin = time.perf_counter()
        result = run(*args)
        times.append(time.perf_counter() - begin)
    return float(np.median(times)), result


def _row(size: str, case: str, seconds: float, sampled: int, decoded: int | None = None) -> dict:
    row = {"size": size, "case": case, "frames": sampled, "seconds": seconds, "clips_per_s": 1 / seconds}
    row["sampled_fps"] = sampled / seconds
    row["decoded_fps"] = decoded / seconds if decoded is not None else None
    print(
        f"{size:>9} {case:<15} {seconds * 1000:8.1f} ms  {row['clips_per_s']:6.2f} clips/s  "
        f"{row['sampled_fps']:7.1f} sampled frames/s",
        flush=True,
    )
    return row


def main(argv: list[str] | None = None) -> None:
    """Encode the test clips, time every case, print a table and optionally write the results file."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--sizes", default="640x360,1280x720", help="comma-separated WIDTHxHEIGHT (default 640x360,1280x720)"
    )
    p.add_argument("--seconds", type=int, default=60, help="clip length in seconds (default 60)")
    p.add_argument("--repeats", type=int, default=3, help="decodes per case; the median is reported (default 3)")
    p.add_argument("--output", help="results JSON file (default: print only)")
    args = p.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes.split(","):
            width, height = (int(v) for v in size.split("x"))
            path = os.path.join(tmp, f"{size}.mp4")
            encode_test_clip(path, width, height, args.seconds)
            mid = args.seconds / 2
            for name, (n, start, end) in CASES.items():
                if start is None:
                    start, end = mid - 5, mid + 5
                seconds, frames = _median_time(args.repeats, decode_clip, path, n, start, end)
                rows.append(_row(size, name, seconds, sampled=len(frames)))
            seconds, frames = _median_time(args.repeats, _decode_all, path)
            rows.append(_row(size, "all frames", seconds, sampled=frames, decoded=frames))
    if args.output:
        extra = {
            "cpu_count": os.cpu_count(),
            "av": av.__version__,
            "libavcodec": ".".join(map(str, av.library_versions["libavcodec"])),
        }
        write_results(args.output, "bench_video_decode.py", argv, extra, clip_seconds=args.seconds, rows=rows)


if __name__ == "__main__":
    main()
