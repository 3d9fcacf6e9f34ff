"""Ask a trained model about a clip: the answer is printed as it is generated.

    python -m lvx_megatron.torchrun --nproc-per-node=2 tools/generate.py --load runs/tiny \\
        --clip clip.mp4 --prompt "how many frames show a red circle?"

Loads the newest checkpoint under ``--load`` written by ``pretrain_mllm.py`` (any family; the run
config saved in it unless ``--config`` is given) into TP x CP = the processes (pipeline size 1),
takes ``--num-frames`` frames of ``--clip`` (or the images ``--frames``), builds the prompt as the
training data does and decodes greedily, or with ``--temperature``/``--top-p``. A prompt longer than
the run's ``data.seq_length`` is an error, or with ``--truncate-prompt`` loses the start of its question.
Each CP rank keeps its frames' visual K/V for every cross-attention layer; only the text query rows travel.
"""

import argparse
import logging
import sys
import warnings
from pathlib import Path

import numpy as np
import torch.distributed as dist

from lvx_megatron.hf.model import UNINFORMATIVE_WARNINGS, add_allow_unverified_flag

warnings.filterwarnings("ignore", category=UserWarning, module=r"megatron\.")
warnings.filterwarnings("ignore", message=UNINFORMATIVE_WARNINGS)
logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
logging.getLogger("megatron").setLevel(logging.WARNING)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (a bad value: one error line naming the flag, exit status 2)."""
    from lvx_megatron.generation.cli import ToolParser, add_layout_flags, float_in, non_blank, positive_int

    parser = ToolParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--load", type=Path, required=True, help="checkpoint directory of a run (its newest)")
    parser.add_argument("--config", type=Path, help="the run's YAML config (default: the one saved in the checkpoint)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--clip", help="a video file (mp4, webm, mkv, ...)")
    source.add_argument("--frames", nargs="+", help="image files, one frame each (all of one size)")
    parser.add_argument("--prompt", type=non_blank("--prompt"), required=True, help="the question about the clip")
    parser.add_argument(
        "--truncate-prompt",
        action="store_true",
        help="drop the start of a question too long for the run's data.seq_length (default: an error)",
    )
    parser.add_argument(
        "--num-frames", type=positive_int("--num-frames"), help="frames taken from --clip (default: data.max_images)"
    )
    parser.add_argument("--max-new-tokens", type=positive_int("--max-new-tokens"), default=32)
    parser.add_argument(
        "--temperature", type=float_in("--temperature", 0, float("inf"), False), default=0.0, help="0: greedy"
    )
    parser.add_argument("--top-p", type=float_in("--top-p", 0, 1, True), default=1.0)
    parser.add_argument("--seed", type=int, default=0, help="seed of the sampling draws")
    add_layout_flags(parser)
    add_allow_unverified_flag(parser)
    return parser.parse_args(argv)


def read_frames(args: argparse.Namespace, max_images: int) -> np.ndarray:
    """uint8 ``[F, H, W, 3]`` from ``--clip`` or ``--frames``; ValueError naming the flag."""
    from PIL import Image

    from lvx_megatron.data.video import decode_clip

    if args.frames:
        if len(args.frames) > max_images:
            raise ValueError(f"--frames: {len(args.frames)} images, the model takes at most {max_images}")
        try:
            images = [np.asarray(Image.open(path).convert("RGB")) for path in args.frames]
        except OSError as exc:
            raise ValueError(f"--frames: {exc}") from None
        if len({im.shape for im in images}) > 1:
            raise ValueError(f"--frames: the images must have one size, got {sorted({im.shape for im in images})}")
        return np.stack(images)
    num_frames = args.num_frames or max_images
    if num_frames > max_images:
        raise ValueError(f"--num-frames must be at most data.max_images ({max_images}), got {num_frames}")
    try:
        return decode_clip(args.clip, num_frames)
    except ValueError as exc:  # VideoError included: names the file
        raise ValueError(f"--clip: {exc}") from None


class _Stream:
    """Prints the answer's new text after every step (global rank 0)."""

    def __init__(self, tokenizer, enabled: bool) -> None:
        self.tokenizer, self.enabled, self.shown = tokenizer, enabled, ""

    def __call__(self, generated: list[list[int]]) -> None:
        from lvx_megatron.generation import answer_text

        text = answer_text(self.tokenizer, generated[0])
        if self.enabled and text.startswith(self.shown):
            print(text[len(self.shown) :], end="", flush=True)
            self.shown = text


def answer(args: argparse.Namespace) -> None:
    """Load the checkpoint, build the prompt and stream the answer (global rank 0 prints)."""
    from lvx_megatron.data.batch import encode_sample
    from lvx_megatron.generation import Sampling, build_prompts, generate, load_for_generation

    loaded = load_for_generation(
        args.load, args.config, args.tensor_model_parallel_size, args.context_parallel_size, args.allow_unverified
    )
    cfg, tokenizer = loaded.cfg, loaded.tokenizer
    frames = read_frames(args, cfg.data.max_images)
    writer = dist.get_rank() == 0
    seq_length = cfg.data.seq_length
    try:
        _, length = encode_sample(args.prompt, "", len(frames), tokenizer)
        if length > seq_length and not args.truncate_prompt:
            raise ValueError(
                f"the prompt is {length} tokens ({len(frames)} frames, bos and the question), longer than the run's "
                f"sequence length data.seq_length = {seq_length}; shorten it, or pass --truncate-prompt"
            )
        sample = {"frames": frames, "question": args.prompt}
        prompts = build_prompts(cfg, tokenizer, [sample], max_length=seq_length if args.truncate_prompt else None)
    except ValueError as exc:
        raise ValueError(f"--prompt: {exc}") from None
    if writer and length > seq_length:
        print(
            f"warning: --truncate-prompt: the prompt is {length} tokens, longer than data.seq_length = {seq_length}: "
            f"its first {length - seq_length} question tokens are dropped",
            file=sys.stderr,
            flush=True,
        )
    if writer:
        p = cfg.parallel
        print(
            f"{cfg.model.architecture} from {args.load} (TP {p.tensor_model_parallel_size}, "
            f"CP {p.context_parallel_size}), {len(frames)} frames",
            file=sys.stderr,
            flush=True,
        )
        print(f"Q: {args.prompt}\nA: ", end="", flush=True)
    generate(
        loaded.model,
        prompts.tokens,
        prompts.images,
        args.max_new_tokens,
        Sampling(args.temperature, args.top_p, args.seed),
        eos_id=tokenizer.eos_id,
        prompt_mask=prompts.prompt_mask,
        on_token=_Stream(tokenizer, writer),
    )
    if writer:
        print(flush=True)


def main(argv: list[str] | None = None) -> int:
    """Run the command; 0 on success, 2 on a bad input (one ``error:`` line on rank 0)."""
    from lvx_megatron.generation.cli import run_command

    args = parse_args(argv)
    return run_command(lambda: answer(args))


if __name__ == "__main__":
    sys.exit(main())
