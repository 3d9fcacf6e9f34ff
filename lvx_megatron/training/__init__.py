"""Training glue of ``pretrain_mllm.py``: config, data, model set-up, loop, checkpoints, logging."""

import os
import sys

from .config import ConfigError, RunConfig, load_config
from .data import DataError


def main(argv: list[str] | None = None) -> dict | None:
    """Entry point: parse flags + YAML, train, return the final metrics (exit 2 on a config error)."""
    from .arguments import parse_run_config

    try:
        cfg = parse_run_config(argv)
        from .loop import Trainer

        trainer = Trainer(cfg)
        try:
            return trainer.run()
        finally:
            trainer.close()
    except (ConfigError, DataError) as exc:
        if os.environ.get("RANK", "0") == "0":
            print(str(exc) if isinstance(exc, ConfigError) else f"data error: {exc}", file=sys.stderr)
        sys.exit(2)


__all__ = ["ConfigError", "RunConfig", "load_config", "main"]
