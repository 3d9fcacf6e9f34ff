"""The JSON results file every GPU tool writes: the data plus the run's device and versions."""

import datetime
import json
import platform
import sys

import torch


def _triton_version() -> str | None:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


def write_results(path: str, tool: str, argv: list[str] | None, extra_meta: dict, **data) -> None:
    """Write ``{"meta": ..., **data}`` to ``path``; meta names the device, versions and command."""
    meta = {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": _triton_version(),
        "python": platform.python_version(),
        "date": datetime.date.today().isoformat(),
        "command": f"python tools/{tool} " + " ".join(argv if argv is not None else sys.argv[1:]),
        **extra_meta,
    }
    with open(path, "w") as f:
        json.dump({"meta": meta, **data}, f, indent=1)
