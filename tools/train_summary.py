"""Summarise a pretrain_mllm.py run's metrics.jsonl: a table and (optionally) a results JSON.

    python tools/train_summary.py runs/single-gpu-1b/metrics.jsonl --skip 2 \
        --command "torchrun --nproc-per-node=1 pretrain_mllm.py --config examples/configs/single-gpu-1b.yaml" \
        --output benchmarks/results/train_1b_h100.json

Steady-state numbers are medians over the logged training steps after the first ``--skip``
(compilation, allocator warm-up); ``median_iterations`` names the first and last of them.
"""

import argparse
import json
import statistics
from pathlib import Path

from lvx_megatron.results import write_results

FIELDS = (
    "step_s",
    "text_tokens_per_s",
    "visual_tokens_per_s",
    "tflops_per_device",
    "mfu",
    "xattn_time_share",
    "max_mem_gib",
    "max_rss_gib",
)


def summarise(records: list[dict], skip: int) -> dict:
    """Medians of the steady-state training records, first and last loss, final eval."""
    train = [r for r in records if r["kind"] == "train"]
    steady = train[skip:] or train
    # Each field over the records that have it: xattn_time_share comes from the sampled steps'
    # records (training.xattn_timing_interval), the rates from the others.
    summary = {k: statistics.median(r[k] for r in steady if k in r) for k in FIELDS if any(k in r for r in steady)}
    summary["median_iterations"] = [steady[0]["iteration"], steady[-1]["iteration"]]
    summary["first_loss"], summary["last_loss"] = train[0]["loss"], train[-1]["loss"]
    summary["steps"] = len(train)
    evals = [r for r in records if r["kind"] == "eval"]
    if evals:
        summary["eval_loss"], summary["eval_accuracy"] = evals[-1]["loss"], evals[-1]["accuracy"]
    return summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("metrics", help="a run's metrics.jsonl")
    parser.add_argument("--skip", type=int, default=2, help="logged steps to leave out as warm-up")
    parser.add_argument("--command", default="", help="the training command, recorded in the JSON")
    parser.add_argument("--output", help="write the results JSON here")
    args = parser.parse_args(argv)
    path = Path(args.metrics)
    if not path.is_file():
        parser.error(f"metrics: no such file {str(path)!r}")
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    summary = summarise(records, args.skip)
    width = max(map(len, summary))
    for key, value in summary.items():
        shown = f"{value:.4g}" if isinstance(value, float) else str(value)
        print(f"{key:<{width}}  {shown}")
    if args.output:
        write_results(args.output, "train_summary.py", argv, {"training_command": args.command}, summary=summary)


if __name__ == "__main__":
    main()
