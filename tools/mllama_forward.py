"""Full logits of a Llama-3.2-Vision checkpoint on Hugging Face processor inputs, in any layout.

    torchrun --nproc-per-node N tools/mllama_forward.py --load CKPT --inputs IN.pt --output OUT.pt \\
        [--tensor-model-parallel-size T] [--pipeline-model-parallel-size P] [--context-parallel-size C]

``IN.pt`` is a dict of the ``MllamaProcessor`` tensors (``input_ids``, ``attention_mask``,
``pixel_values``, ``aspect_ratio_ids``, ``aspect_ratio_mask``, ``cross_attention_mask``);
``OUT.pt`` holds the float32 logits ``[B, S, vocab]`` (HF's vocabulary) written by rank 0. The
sequence is padded to a multiple of CP (x TP under sequence parallelism) inside and cropped
back. Padding must be on the right (``attention_mask``); logits at padded positions are not
meaningful (the model is causal only, so the real positions are not affected by the padding).
"""

import argparse
import sys
import warnings
from pathlib import Path

import torch

from lvx_megatron.hf.forward import forward_logits
from lvx_megatron.hf.model import UNINFORMATIVE_WARNINGS, add_allow_unverified_flag

warnings.filterwarnings("ignore", message=UNINFORMATIVE_WARNINGS)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (a bad value: one error line naming the flag, exit status 2)."""
    from lvx_megatron.generation.cli import ToolParser

    parser = ToolParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--load", type=Path, required=True, help="checkpoint directory (its newest iteration)")
    parser.add_argument("--inputs", type=Path, required=True, help="torch.save'd dict of HF processor tensors")
    parser.add_argument("--output", type=Path, required=True, help="where rank 0 writes the logits [B, S, vocab]")
    parser.add_argument("--tensor-model-parallel-size", type=int, default=1)
    parser.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    parser.add_argument("--context-parallel-size", type=int, default=1)
    parser.add_argument("--vocab-size", type=int, help="crop logits to this vocabulary (default: HF's, if imported)")
    add_allow_unverified_flag(parser)
    return parser.parse_args(argv)


def forward(args: argparse.Namespace) -> None:
    """The logits of ``--inputs``, written by rank 0 to ``--output``."""
    inputs = torch.load(args.inputs, weights_only=True)
    logits = forward_logits(
        args.load,
        inputs,
        args.tensor_model_parallel_size,
        args.pipeline_model_parallel_size,
        args.context_parallel_size,
        args.vocab_size,
        args.allow_unverified,
    )
    if logits is not None:
        torch.save(logits, args.output)
        print(f"wrote {args.output}: logits {tuple(logits.shape)}", flush=True)


def main(argv: list[str] | None = None) -> int:
    """Run the command; 0 on success, 2 on a bad input (one ``error:`` line; ConfigError included)."""
    from lvx_megatron.generation.cli import run_command

    args = parse_args(argv)
    return run_command(lambda: forward(args))


if __name__ == "__main__":
    sys.exit(main())
