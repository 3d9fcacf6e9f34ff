"""``python -m lvx_megatron.torchrun``: torchrun that ends a failed run with its workers' one-line errors.

torchrun reports a failed worker with its own traceback and a ~30-line ``ChildFailedError``
block, even when the workers already said what is wrong in one line (``config error: ...``,
``data error: ...``, exit status 2). This launcher takes torchrun's flags unchanged and runs
torchrun's own code (``torch.distributed.run``). When every failed worker reported a one-line
error (in its torchelastic error file, see :func:`report_error`), it prints each distinct line
once and exits with the workers' exit status; every other failure (a crash with a traceback, a
signal, a hang) is reported exactly as torchrun reports it.

    python -m lvx_megatron.torchrun --nproc-per-node=2 pretrain_mllm.py --config examples/configs/tiny.yaml
"""

import json
import logging
import os
import signal
import sys
import time

# Set by the launcher for its workers: it prints their one-line errors, so they do not.
LAUNCHER_ENV = "LVX_TORCHRUN"
# Key of the one-line message in a worker's error file (the rest is torchelastic's own format).
ERROR_FILE_KEY = "lvx_one_line_error"
# The agent stops the other workers of a failed group with these signals.
_STOP_SIGNALS = (-signal.SIGTERM, -signal.SIGKILL)
# The logger of torchelastic's process contexts: "failed (exitcode ...)" and "Sending process ...
# closing signal" on a failure, which say nothing more than the one-line errors.
_PROCESS_LOGGER = "torch.distributed.elastic.multiprocessing.api"


def report_error(message: str) -> None:
    """Report this process's one-line error: to stderr, and under torchrun to its torchelastic error file.

    Rank 0 prints it (every rank has the same config errors), unless this launcher started the
    process: then the launcher prints the distinct lines of all ranks.
    """
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if error_file:
        # torchelastic's format, so plain torchrun shows the line in its report too.
        data = {"message": {"message": message, "extraInfo": {"timestamp": str(int(time.time()))}}}
        tmp = f"{error_file}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump({**data, ERROR_FILE_KEY: message}, f)
        os.replace(tmp, error_file)  # the agent may read it at any moment: never half-written
    if os.environ.get(LAUNCHER_ENV) != "1" and os.environ.get("RANK", "0") == "0":
        print(message, file=sys.stderr, flush=True)


def one_line_errors(failures: dict) -> tuple[list[str], int] | None:
    """(distinct one-line errors in rank order, their exit status) when every failed worker of
    ``failures`` (torchelastic's ``{global rank: ProcessFailure}``) reported one or was stopped by the
    agent after another failed; None otherwise."""
    lines, statuses = [], []
    for rank in sorted(failures):
        failure = failures[rank]
        line = failure.error_file_data.get(ERROR_FILE_KEY) if isinstance(failure.error_file_data, dict) else None
        if line is None:
            if failure.exitcode not in _STOP_SIGNALS:
                return None
            continue
        if line not in lines:
            lines.append(line)
        if failure.exitcode > 0:  # (a rank stopped by the agent between reporting and exiting has none)
            statuses.append(failure.exitcode)
    # The agent stops workers only after one failed by itself, so a reporting rank exited with a status.
    return (lines, statuses[0]) if statuses else None


class _HeldRecords(logging.Filter):
    """Holds back a logger's records until the run's outcome decides whether they are shown."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.logger = logging.getLogger(name)
        self.records: list[logging.LogRecord] = []
        self.logger.addFilter(self)

    def filter(self, record: logging.LogRecord) -> bool:
        self.records.append(record)
        return False

    def release(self, show: bool) -> None:
        self.logger.removeFilter(self)
        for record in self.records if show else ():
            self.logger.handle(record)


def main(argv: list[str] | None = None) -> None:
    """Run torchrun with ``argv`` (default: the command line)."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    args = parse_args(sys.argv[1:] if argv is None else argv)
    os.environ[LAUNCHER_ENV] = "1"
    held = _HeldRecords(_PROCESS_LOGGER)
    reported = None
    try:
        run(args)
    except ChildFailedError as exc:
        reported = one_line_errors(exc.failures)
        if reported is None:
            raise
    except SignalException as exc:
        # torchrun passed the signal on to the workers and waited for them (a run saves a checkpoint
        # and stops on SIGTERM/SIGUSR1); its traceback would say nothing more. 128 + signal, as a shell.
        name = signal.Signals(exc.sigval).name
        reported = (
            [f"launcher: {name}: passed on to the workers, which have ended; see their output above"],
            128 + exc.sigval,
        )
    finally:
        held.release(show=reported is None)
    if reported is not None:
        lines, status = reported
        for line in lines:
            print(line, file=sys.stderr, flush=True)
        sys.exit(status)


if __name__ == "__main__":
    main()
