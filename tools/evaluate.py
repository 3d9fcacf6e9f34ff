"""Generated-answer accuracy of a run's checkpoint on its held-out clips, per question type.

    python -m lvx_megatron.torchrun --nproc-per-node=2 tools/evaluate.py runs/tiny --split eval

Loads the newest checkpoint under RUN_DIR (the run config saved in it unless ``--config`` is given)
into TP x CP (x data-parallel replicas = the rest of the processes), and for each clip of the split
generates an answer greedily (exact match against the reference, white space aside) and scores the
same clip teacher-forced (every answer token the arg-max, as the training loop's held-out
``accuracy``). Prints a table per question type, beside the held-out accuracy the run logged in its
``metrics.jsonl`` at the checkpoint's iteration (none when it did not evaluate there); ``--output``
writes it as a results file.
"""

import argparse
import json
import logging
import sys
import warnings
from pathlib import Path

import torch.distributed as dist

from lvx_megatron.hf.model import UNINFORMATIVE_WARNINGS, add_allow_unverified_flag

warnings.filterwarnings("ignore", category=UserWarning, module=r"megatron\.")
warnings.filterwarnings("ignore", message=UNINFORMATIVE_WARNINGS)
logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
logging.getLogger("megatron").setLevel(logging.WARNING)

SPLITS = ("train", "eval")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (a bad value: one error line naming the flag, exit status 2)."""
    from lvx_megatron.generation.cli import ToolParser, add_layout_flags, positive_int

    parser = ToolParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path, help="the run's checkpoint directory (its newest checkpoint)")
    parser.add_argument("--config", type=Path, help="the run's YAML config (default: the one saved in the checkpoint)")
    parser.add_argument("--split", choices=SPLITS, default="eval", help="which split's clips (default: eval)")
    parser.add_argument("--limit", type=positive_int("--limit"), help="score only the first N clips")
    parser.add_argument("--batch-size", type=positive_int("--batch-size"), default=32, help="clips per batch")
    parser.add_argument("--max-new-tokens", type=positive_int("--max-new-tokens"), default=16)
    parser.add_argument("--output", type=Path, help="write the scores as a results file (JSON)")
    add_layout_flags(parser)
    add_allow_unverified_flag(parser)
    return parser.parse_args(argv)


def logged_accuracy(run_dir: Path, iteration: int) -> dict | None:
    """The run's held-out record of ``iteration`` in its ``metrics.jsonl`` (the last one, when a resumed run
    evaluated it again; None without one)."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return None
    last = None
    for line in path.read_text().splitlines():
        record = json.loads(line) if line.strip() else {}
        if record.get("kind") == "eval" and record.get("iteration") == iteration:
            last = record
    return last


def rows_of(evaluation, logged: dict | None) -> list[dict]:
    """One row per question type (``all`` first) with both accuracies and the run's logged one."""
    rows = []
    for name, score in evaluation.scores.items():
        key = "accuracy" if name == "all" else f"accuracy/{name}"
        rows.append(
            {
                "question_type": name,
                "clips": score.samples,
                "generated_exact_match": score.generated_accuracy,
                "teacher_forced": score.forced_accuracy,
                "logged_teacher_forced": None if logged is None else logged.get(key),
            }
        )
    return rows


def print_table(rows: list[dict], evaluation, logged: dict | None, iteration: int) -> None:
    """The scores as a markdown table, the skipped clips and a few answers."""
    from lvx_megatron.results import rows_table

    print(
        rows_table(
            rows,
            [
                ("question_type", ""),
                ("clips", "d"),
                ("generated_exact_match", ".3f"),
                ("teacher_forced", ".3f"),
                ("logged_teacher_forced", ".3f"),
            ],
        )
    )
    there = "on its own draws" if logged else "none logged there"
    print(f"(logged_teacher_forced: the run's held-out evaluation at the checkpoint's iteration {iteration}, {there})")
    if evaluation.skipped:
        print(f"{evaluation.skipped} clips skipped (too many frames or tokens for the run's data settings)")
    for ex in evaluation.examples:
        print(f"  Q: {ex['question']} | reference: {ex['answer']} | generated: {ex['generated']}")


def evaluate(args: argparse.Namespace, argv: list[str] | None) -> None:
    """Load the run, score the split's clips and print (global rank 0) and write the scores."""
    from lvx_megatron.generation import load_for_generation
    from lvx_megatron.generation.evaluation import ProgressLine, evaluate_answers
    from lvx_megatron.results import write_results
    from lvx_megatron.training.data import prepare_datasets

    loaded = load_for_generation(
        args.run_dir, args.config, args.tensor_model_parallel_size, args.context_parallel_size, args.allow_unverified
    )
    cfg = loaded.cfg
    if cfg.data.kind == "energon":
        raise ValueError(
            "data.kind: tools/evaluate.py reads shards, video_jsonl and synthetic_video_qa data, not energon "
            "datasets; convert the split's clips to a video_jsonl folder"
        )
    dataset = prepare_datasets(cfg)[args.split]
    writer = dist.get_rank() == 0
    if writer:
        p = cfg.parallel
        replicas = dist.get_world_size() // (p.tensor_model_parallel_size * p.context_parallel_size)
        count = min(args.limit or len(dataset), len(dataset))
        print(
            f"[evaluate] {cfg.model.architecture} from {args.run_dir} (TP {p.tensor_model_parallel_size}, "
            f"CP {p.context_parallel_size}, {replicas} replicas), iteration {loaded.checkpoint.iteration} "
            f"({loaded.checkpoint.reason}): {count} clips of {cfg.data.path} {args.split}",
            flush=True,
        )
    evaluation = evaluate_answers(
        loaded,
        dataset,
        list(getattr(dataset, "question_types", [])),
        args.batch_size,
        args.max_new_tokens,
        args.limit,
        ProgressLine(writer),
    )
    iteration = loaded.checkpoint.iteration
    logged = logged_accuracy(args.run_dir, iteration)
    rows = rows_of(evaluation, logged)
    if writer:
        print_table(rows, evaluation, logged, iteration)
        if args.output is not None:
            meta = {
                "run_dir": str(args.run_dir),
                "split": args.split,
                "architecture": cfg.model.architecture,
                "iteration": iteration,
                "checkpoint": str(loaded.checkpoint.path),
                "why": loaded.checkpoint.reason,
            }
            write_results(
                str(args.output), "evaluate.py", argv, meta, rows=rows, skipped=evaluation.skipped,
                examples=evaluation.examples,
            )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    """Run the command; 0 on success, 2 on a bad input (one ``error:`` line on rank 0)."""
    from lvx_megatron.generation.cli import run_command

    args = parse_args(argv)
    return run_command(lambda: evaluate(args, argv))


if __name__ == "__main__":
    sys.exit(main())
