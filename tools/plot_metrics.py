"""Draw a run's loss, held-out accuracy and throughput from its metrics.jsonl into a PNG.

    python tools/plot_metrics.py runs/tiny              # writes runs/tiny/metrics.png
    python tools/plot_metrics.py runs/tiny --output curves.png

The same picture ``pretrain_mllm.py`` writes at the end of a run (``lvx_megatron.training.plots``).
"""

import argparse
import sys

from lvx_megatron.training.plots import plot_run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", help="a run's folder (checkpoint.save or logging.run_dir): holds metrics.jsonl")
    parser.add_argument("--output", help="the PNG to write (default: RUN_DIR/metrics.png)")
    args = parser.parse_args(argv)
    try:
        print(plot_run(args.run_dir, args.output))
    except FileNotFoundError as exc:
        print(f"plot_metrics: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
