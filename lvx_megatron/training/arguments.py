"""Command line of ``pretrain_mllm.py``: ``--config FILE.yaml`` plus Megatron-LM's own flags.

The flags are defined by ``megatron.training.arguments.add_megatron_arguments`` (shipped in the
megatron-core wheel), so they are spelled, typed and documented exactly as in Megatron-LM. Only
the flags a user actually passes are applied, on top of the YAML file; a Megatron flag that this
entry point does not use is an error rather than silently ignored.
"""

import argparse
from typing import Any

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
    "exit_interval": "training.exit_interval",
    "save": "checkpoint.save",
    "load": "checkpoint.load",
    "save_interval": "checkpoint.save_interval",
    "wandb_project": "logging.wandb_project",
    "wandb_exp_name": "logging.wandb_exp_name",
    "wandb_save_dir": "logging.wandb_save_dir",
}


def build_parser() -> argparse.ArgumentParser:
    """Megatron-LM's parser plus ``--config`` and ``--wandb-mode``; no defaults are filled in."""
    from megatron.training.arguments import add_megatron_arguments

    parser = argparse.ArgumentParser(
        prog="pretrain_mllm.py",
        description="Train a Llama-3.2-Vision-style model with context-parallel cross-attention.",
        allow_abbrev=False,
    )
    parser.add_argument("--config", required=True, help="YAML run config (see examples/configs/)")
    parser.add_argument(
        "--wandb-mode", choices=["auto", "online", "offline", "disabled"], help="W&B mode (auto: offline w/o key)"
    )
    add_megatron_arguments(parser)
    for action in parser._actions:
        if action.dest not in ("help", "config"):
            action.default = argparse.SUPPRESS
    return parser


def overrides_from_flags(flags: dict[str, Any]) -> dict[str, Any]:
    """Dotted-field overrides from the flags a user passed; unused Megatron flags are errors."""
    overrides: dict[str, Any] = {}
    for dest, value in flags.items():
        if dest == "config":
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
                "set the matching field in the YAML config instead (README: config reference)"
            )
    return overrides


def parse_run_config(argv: list[str] | None = None) -> RunConfig:
    """Parse the command line and return the validated run config."""
    args = build_parser().parse_args(argv)
    flags = vars(args)
    return load_config(flags["config"], overrides_from_flags(flags))
