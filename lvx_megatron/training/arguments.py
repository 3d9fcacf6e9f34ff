"""Command line of ``pretrain_mllm.py``: ``--config FILE.yaml`` plus Megatron-LM's own flags.

The flags are defined by ``megatron.training.arguments.add_megatron_arguments`` (shipped in the
megatron-core wheel), so they are spelled, typed and documented exactly as in Megatron-LM. Only
the flags a user actually passes are applied, on top of the YAML file; a Megatron flag that this
entry point does not use is an error rather than silently ignored.
"""

import argparse
import difflib
import re
from dataclasses import dataclass
from typing import Any, NoReturn

from .config import ConfigError, RunConfig, load_config

# Megatron-LM flag destination -> dotted field of RunConfig.
FLAG_FIELDS: dict[str, str] = {
    "tensor_model_parallel_size": "parallel.tensor_model_parallel_size",
    "pipeline_model_parallel_size": "parallel.pipeline_model_parallel_size",
    "context_parallel_size": "parallel.context_parallel_size",
    "sequence_parallel": "parallel.sequence_parallel",
    "use_distributed_optimizer": "parallel.use_distributed_optimizer",
    "micro_batch_size": "training.micro_batch_size",
    "global_batch_size": "training.global_batch_size",
    "train_iters": "training.train_iters",
    "lr": "training.lr",
    "min_lr": "training.min_lr",
    "lr_warmup_iters": "training.lr_warmup_iters",
    "lr_decay_style": "training.lr_decay_style",
    "weight_decay": "training.weight_decay",
    "adam_beta1": "training.adam_beta1",
    "adam_beta2": "training.adam_beta2",
    "clip_grad": "training.clip_grad",
    "seed": "training.seed",
    "log_interval": "training.log_interval",
    "eval_interval": "training.eval_interval",
    "eval_iters": "training.eval_iters",
    "profile": "training.profile",
    "use_pytorch_profiler": "training.profile",  # Megatron-LM's spelling of the same; ours is always torch's
    "profile_step_start": "training.profile_step_start",
    "profile_step_end": "training.profile_step_end",
    "profile_ranks": "training.profile_ranks",
    "exit_interval": "training.exit_interval",
    "save": "checkpoint.save",
    "load": "checkpoint.load",
    "save_interval": "checkpoint.save_interval",
    "override_opt_param_scheduler": "checkpoint.override_opt_param_scheduler",
    "use_checkpoint_opt_param_scheduler": "checkpoint.use_checkpoint_opt_param_scheduler",
    "wandb_project": "logging.wandb_project",
    "wandb_exp_name": "logging.wandb_exp_name",
    "wandb_save_dir": "logging.wandb_save_dir",
}


# Flags handled outside FLAG_FIELDS.
_OTHER_FLAGS = ("config", "print_config", "wandb_mode", "bf16", "help")


class _OneLineErrorParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one-line ConfigErrors naming the flag.

    argparse's own ``error`` prints the whole usage first, which for Megatron-LM's flags is
    hundreds of lines above the one that matters.
    """

    def error(self, message: str) -> NoReturn:
        if m := re.fullmatch(r"argument (\S+): (.*)", message):
            raise ConfigError(f"config error: {m[1]}: {m[2]}")
        if m := re.fullmatch(r"the following arguments are required: (.*)", message):
            raise ConfigError(f"config error: {m[1]}: required")
        raise ConfigError(f"config error: {message}")


def _unknown_argument(parser: argparse.ArgumentParser, arg: str) -> ConfigError:
    """The error for the first argument the parser does not know, with the closest flag we use."""
    if not arg.startswith("-"):
        return ConfigError(f"config error: {arg!r}: unexpected argument; pretrain_mllm.py takes only flags")
    flag = arg.split("=", 1)[0]
    used = [s for a in parser._actions if a.dest in FLAG_FIELDS or a.dest in _OTHER_FLAGS for s in a.option_strings]
    close = difflib.get_close_matches(flag, used, n=1)
    hint = f"did you mean {close[0]}?" if close else "pretrain_mllm.py --help lists the flags"
    return ConfigError(f"config error: {flag}: unknown flag ({hint})")


def build_parser() -> argparse.ArgumentParser:
    """Megatron-LM's parser plus ``--config`` and ``--wandb-mode``; no defaults are filled in.

    Its errors are one-line ConfigErrors (see :class:`_OneLineErrorParser`).
    """
    from megatron.training.arguments import add_megatron_arguments

    parser = _OneLineErrorParser(
        prog="pretrain_mllm.py",
        description="Train a Llama-3.2-Vision-style model with context-parallel cross-attention.",
        allow_abbrev=False,
    )
    parser.add_argument("--config", required=True, help="YAML run config (see examples/configs/)")
    parser.add_argument(
        "--print-config",
        action="store_true",
        help="print the whole config (its base files merged, flags applied, defaults filled in) and exit",
    )
    parser.add_argument(
        "--wandb-mode", choices=["auto", "online", "offline", "disabled"], help="W&B mode (auto: offline w/o key)"
    )
    add_megatron_arguments(parser)
    for action in parser._actions:
        if action.dest not in ("help", "config", "print_config"):
            action.default = argparse.SUPPRESS
    return parser


def overrides_from_flags(flags: dict[str, Any]) -> dict[str, Any]:
    """Dotted-field overrides from the flags a user passed; unused Megatron flags are errors."""
    overrides: dict[str, Any] = {}
    for dest, value in flags.items():
        if dest in ("config", "print_config"):
            continue
        if dest == "wandb_mode":
            overrides["logging.wandb_mode"] = value
        elif dest == "bf16":
            overrides["training.precision"] = "bf16" if value else "fp32"
        elif dest in FLAG_FIELDS:
            overrides[FLAG_FIELDS[dest]] = value
        else:
            flag = "--" + dest.replace("_", "-")
            raise ConfigError(
                f"config error: {flag}: a Megatron-LM flag that pretrain_mllm.py does not use; "
                "set the matching field in the YAML config instead (docs/training.md: config reference)"
            )
    return overrides


@dataclass(frozen=True)
class CommandLine:
    """What ``pretrain_mllm.py``'s command line asks for: the run's config, and whether only to print it."""

    cfg: RunConfig
    print_config: bool


def parse_command_line(argv: list[str] | None = None) -> CommandLine:
    """Parse the command line and validate the run config; ConfigError (one line) if either is bad."""
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        raise _unknown_argument(parser, unknown[0])
    flags = vars(args)
    return CommandLine(load_config(flags["config"], overrides_from_flags(flags)), flags["print_config"])
