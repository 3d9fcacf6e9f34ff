"""Convert Llama-3.2-Vision checkpoints between Hugging Face and lvx-megatron.

    python tools/convert_hf_checkpoint.py import --hf-dir HF --out CKPT [--dtype bfloat16]
    python tools/convert_hf_checkpoint.py export --load CKPT --out HF [--dtype bfloat16]

``import`` writes a megatron-core distributed checkpoint (model weights only, loads in any
TP/PP/CP layout: ``pretrain_mllm.py --load CKPT``) plus ``CKPT/model.yaml``, a run config whose
``model`` section describes the checkpoint. ``export`` writes ``config.json`` and safetensors
files (sharded with an index above ``--max-shard-size``) that
``transformers.MllamaForConditionalGeneration.from_pretrained`` loads. Both run in one process on
the CPU and hold at most one converted copy of the model in memory (HF tensors are read one at a
time). The conversion: ``lvx_megatron/hf/``; name and layout mapping:
``lvx_megatron/models/hf_mapping.py``.
"""

import argparse
import sys
import warnings
from pathlib import Path

from lvx_megatron.hf.exporter import export_checkpoint
from lvx_megatron.hf.importer import import_checkpoint
from lvx_megatron.hf.model import DTYPES, UNINFORMATIVE_WARNINGS, add_allow_unverified_flag

warnings.filterwarnings("ignore", message=UNINFORMATIVE_WARNINGS)


def _size(text: str) -> int:
    units = {"KB": 2**10, "MB": 2**20, "GB": 2**30}
    for unit, factor in units.items():
        if text.upper().endswith(unit):
            return int(float(text[: -len(unit)]) * factor)
    return int(text)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (a bad value: one error line naming the flag, exit status 2)."""
    from lvx_megatron.generation.cli import ToolParser

    parser = ToolParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    imp = sub.add_parser("import", help="HF mllama directory -> distributed checkpoint + model.yaml")
    imp.add_argument("--hf-dir", type=Path, required=True, help="config.json + *.safetensors [+ index json]")
    imp.add_argument("--out", type=Path, required=True, help="checkpoint directory to write (--load of training)")
    imp.add_argument("--dtype", choices=DTYPES, default="float32", help="dtype of the stored weights")
    exp = sub.add_parser("export", help="distributed checkpoint -> HF directory")
    exp.add_argument("--load", type=Path, required=True, help="checkpoint directory (its newest iteration)")
    exp.add_argument("--out", type=Path, required=True, help="HF directory to write")
    exp.add_argument("--dtype", choices=DTYPES, default="float32", help="dtype of the written safetensors")
    exp.add_argument(
        "--hf-config", type=Path, help="config.json to start from (default: the one stored by import, if any)"
    )
    exp.add_argument("--vocab-size", type=int, help="text vocab_size, when neither --hf-config nor import gives it")
    exp.add_argument("--max-shard-size", type=_size, default="5GB", help="largest safetensors file (default 5GB)")
    add_allow_unverified_flag(exp)
    return parser.parse_args(argv)


def convert(args: argparse.Namespace) -> None:
    """Import or export as ``args.command`` says."""
    if args.command == "import":
        import_checkpoint(args.hf_dir, args.out, args.dtype)
    else:
        export_checkpoint(
            args.load, args.out, args.dtype, args.hf_config, args.vocab_size, args.max_shard_size, args.allow_unverified
        )


def main(argv: list[str] | None = None) -> int:
    """Run the command; 0 on success, 2 on a bad input (one ``error:`` line naming the field or file; config
    errors included), 1 when the output cannot be written (a full disk, an unwritable ``--out``)."""
    from lvx_megatron.generation.cli import run_command
    from lvx_megatron.training.checkpointing import CheckpointSaveError

    args = parse_args(argv)
    return run_command(lambda: convert(args), write_errors=(CheckpointSaveError, OSError))


if __name__ == "__main__":
    sys.exit(main())
