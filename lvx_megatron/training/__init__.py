"""Training glue of ``pretrain_mllm.py``: config, data, model set-up, loop, checkpoints, logging."""

import sys

from ..torchrun import report_error
from .config import ConfigError, RunConfig, config_yaml, load_config
from .data import DataError


def main(argv: list[str] | None = None) -> dict | None:
    """Entry point: parse flags + YAML, train, return the final metrics.

    Exit status 2 on a config (or unusable checkpoint) or data error, 1 when a checkpoint cannot be
    written or the weights diverged; each is one line on stderr (see ``lvx_megatron.torchrun.report_error``).
    """
    from .arguments import parse_command_line

    try:
        command = parse_command_line(argv)
        if command.print_config:
            print(config_yaml(command.cfg), end="")
            return None
        cfg = command.cfg
        from .checkpointing import CheckpointSaveError
        from .loop import Trainer, TrainingDiverged

        trainer = Trainer(cfg)
        try:
            return trainer.run()
        except CheckpointSaveError as exc:
            report_error(f"checkpoint error: {exc}")
            sys.exit(1)
        except TrainingDiverged as exc:
            report_error(f"training error: {exc}")
            sys.exit(1)
        finally:
            trainer.close()
    except (ConfigError, DataError) as exc:
        report_error(str(exc) if isinstance(exc, ConfigError) else f"data error: {exc}")
        sys.exit(2)


__all__ = ["ConfigError", "RunConfig", "load_config", "main"]
