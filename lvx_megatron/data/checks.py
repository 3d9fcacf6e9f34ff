"""Argument checks and message helpers shared by the data modules."""

CUT_CHARS = 80  # the longest value a message shows whole
PATH_CHARS = 4096  # PATH_MAX: a file's real path is shown whole, a megabyte-long name from a data file is cut


def check_positive(**values: int) -> None:
    """Raise ValueError naming the first of ``values`` (name=value) below 1."""
    for name, value in values.items():
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")


def cut(text: str, limit: int = CUT_CHARS) -> str:
    """``text`` for a message: itself when short, else its start, ``...`` and its length (a value read
    from a data file may be megabytes long, and a message is one log line)."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def located(where: str, message: str) -> str:
    """``message`` starting with ``where`` (``FILE:LINE`` or ``FILE:KEY``), which it may already start with."""
    return message if message.startswith(where) else f"{where}: {message}"
