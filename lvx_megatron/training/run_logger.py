"""Where a run's metrics go: console, ``metrics.jsonl`` and Weights & Biases.

Only one rank writes. W&B runs offline when no credentials are configured (``WANDB_API_KEY`` or
a ``wandb login`` entry in ``~/.netrc``), and any W&B failure is reported once and then ignored:
logging must never stop or hang training. A resumed run continues the same W&B run.
"""

import json
import math
import os
import sys
import time
import uuid
import warnings
from pathlib import Path

from .config import RunConfig


def _has_wandb_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path.home() / ".netrc"
    return netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore")


def _finite(value):
    return value if not isinstance(value, float) or math.isfinite(value) else str(value)


class RunLogger:
    """Console + JSON lines + W&B for one run (a no-op on ranks that are not the writer)."""

    def __init__(self, cfg: RunConfig, writer: bool) -> None:
        self.writer = writer
        self.wandb = None
        self.jsonl = None
        self.wandb_dir: Path | None = None
        self._progress: tuple[int, int, float] | None = None  # first iteration, total, start time
        if not writer:
            return
        out = cfg.output_dir
        out.mkdir(parents=True, exist_ok=True)
        self.jsonl = (out / "metrics.jsonl").open("a", buffering=1)
        self._start_wandb(cfg, out)

    def _start_wandb(self, cfg: RunConfig, out: Path) -> None:
        lg = cfg.logging
        mode = lg.wandb_mode
        if mode == "auto":
            mode = "online" if _has_wandb_credentials() else "offline"
        if mode == "disabled" or not lg.wandb_project:
            return
        save_dir = Path(lg.wandb_save_dir or out)
        save_dir.mkdir(parents=True, exist_ok=True)
        id_file = out / "wandb_run_id.txt"
        try:
            import wandb

            run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:12]
            self.wandb = wandb.init(
                project=lg.wandb_project,
                name=lg.wandb_exp_name,
                dir=str(save_dir),
                id=run_id,
                resume="allow",
                mode=mode,
                config=cfg.model_dump(),
                settings=wandb.Settings(init_timeout=90, silent=True),
            )
            id_file.write_text(run_id)
            self.wandb_dir = save_dir / "wandb"
            self.console(f"W&B: {mode} run {run_id} in {self.wandb_dir}")
        except Exception as exc:  # W&B must never take training down
            warnings.warn(f"W&B disabled for this run: {exc}", stacklevel=2)
            self.wandb = None

    def begin(self, first_iteration: int, total: int) -> None:
        """Start the clock of the progress shown on train lines (iteration out of ``total``, ETA)."""
        self._progress = (first_iteration, total, time.monotonic())

    def elapsed(self) -> float:
        """Seconds since :meth:`begin`."""
        return time.monotonic() - self._progress[2] if self._progress else 0.0

    def _position(self, kind: str, iteration: int) -> str:
        if self._progress is None:
            return f"{iteration:>6}"
        first, total, start = self._progress
        text = f"{iteration:>{len(str(total))}}/{total}"
        done = iteration - first
        if kind == "train" and done > 0 and iteration < total:
            text += f" (ETA {format_duration((time.monotonic() - start) / done * (total - iteration))})"
        return text

    def console(self, text: str) -> None:
        if self.writer:
            print(text, flush=True)
            sys.stdout.flush()

    def log(self, kind: str, iteration: int, metrics: dict) -> None:
        """Write one record: console line, a JSON line, and W&B (``kind/metric`` keys)."""
        if not self.writer:
            return
        record = {"kind": kind, "iteration": iteration, "time": time.time(), **metrics}
        self.jsonl.write(json.dumps({k: _finite(v) for k, v in record.items()}) + "\n")
        shown = " | ".join(f"{k} {_format(v)}" for k, v in metrics.items())
        self.console(f"[{kind}] iter {self._position(kind, iteration)} | {shown}")
        if self.wandb is not None:
            try:
                self.wandb.log({f"{kind}/{k}": v for k, v in metrics.items()}, step=iteration)
            except Exception as exc:
                warnings.warn(f"W&B logging failed, continuing without it: {exc}", stacklevel=2)
                self.wandb = None

    def close(self) -> None:
        if self.jsonl is not None:
            self.jsonl.close()
        if self.wandb is not None:
            try:
                self.wandb.finish()
                import wandb

                wandb.teardown()  # ends W&B's service process with the run, not at interpreter exit
            except Exception as exc:
                warnings.warn(f"W&B finish failed: {exc}", stacklevel=2)


def format_duration(seconds: float) -> str:
    """``42s``, ``3m05s`` or ``1h02m``."""
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def _format(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
