"""The measured block-attention rates that ``strategy="auto"`` reads on GPUs (package data).

``rates/block_attention.json`` is made by ``tools/make_rate_table.py`` from a results file of
``tools/bench_block_attention.py``: ``meta`` (device, versions, the source results file and its
git commit when recorded) and ``rows`` of ``{hq, hkv, head_dim, sq, skv, mask, fwd_tflops,
fwd_bwd_tflops}``, where ``mask`` is ``"none"`` (unmasked blocks) or ``"image"`` (the models'
image mask: every text token sees every frame, tile padding ids -1). It is read through
``importlib.resources``, so an installed copy of the package finds it.
"""

import json
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path

from .cost_model import ComputeModel

MASKS = ("none", "image")
ROW_FIELDS = ("hq", "hkv", "head_dim", "sq", "skv", "mask", "fwd_tflops", "fwd_bwd_tflops")
_INT_FIELDS = ("hq", "hkv", "head_dim", "sq", "skv")


class RateTableError(RuntimeError):
    """The rate table is missing, unreadable or malformed; the message is one line naming the file."""


def shipped_table() -> Traversable:
    """The table inside the installed package."""
    return resources.files("lvx_megatron.ops").joinpath("rates", "block_attention.json")


def check_rate_table(table: object, where: str) -> None:
    """Raise :class:`RateTableError` (naming ``where``) unless ``table`` is a well-formed rate table."""

    def bad(problem: str) -> RateTableError:
        return RateTableError(f"block-attention rate table {where}: {problem}")

    if (
        not isinstance(table, dict)
        or not isinstance(table.get("meta"), dict)
        or not isinstance(table.get("rows"), list)
    ):
        raise bad("expected an object with 'meta' and 'rows'")
    seen = set()
    for i, row in enumerate(table["rows"]):
        if not isinstance(row, dict) or set(row) != set(ROW_FIELDS):
            raise bad(f"row {i} must have exactly the fields {list(ROW_FIELDS)}")
        if row["mask"] not in MASKS:
            raise bad(f"row {i}: mask must be one of {list(MASKS)}, got {row['mask']!r}")
        if not all(isinstance(row[k], int) and row[k] > 0 for k in _INT_FIELDS):
            raise bad(f"row {i}: {', '.join(_INT_FIELDS)} must be positive integers")
        if not all(isinstance(row[k], int | float) and row[k] > 0 for k in ("fwd_tflops", "fwd_bwd_tflops")):
            raise bad(f"row {i}: fwd_tflops and fwd_bwd_tflops must be positive numbers")
        if row["hq"] % row["hkv"]:
            raise bad(f"row {i}: hq {row['hq']} is not a multiple of hkv {row['hkv']}")
        key = tuple(row[k] for k in ROW_FIELDS[:6])
        if key in seen:
            raise bad(f"row {i} repeats {dict(zip(ROW_FIELDS[:6], key, strict=True))}")
        seen.add(key)
    for mask in MASKS:
        if not any(row["mask"] == mask for row in table["rows"]):
            raise bad(f"no rows with mask {mask!r}")
        try:
            compute_model(table, mask)
        except ValueError as err:
            raise bad(f"mask {mask!r}: {err}") from err


def load_rate_table(path: str | Path | None = None) -> dict:
    """The rate table at ``path`` (None: the shipped one); :class:`RateTableError` if it is missing or malformed."""
    source = shipped_table() if path is None else Path(path)
    try:
        text = source.read_text()
    except OSError as err:
        raise RateTableError(f"block-attention rate table {source}: cannot be read ({err.strerror or err})") from err
    try:
        table = json.loads(text)
    except ValueError as err:
        raise RateTableError(f"block-attention rate table {source}: not JSON ({err})") from err
    check_rate_table(table, str(source))
    return table


def compute_model(table: dict, mask: str) -> ComputeModel:
    """The :class:`~.cost_model.ComputeModel` of the table's rows with ``mask`` (``"none"`` or ``"image"``)."""
    if mask not in MASKS:
        raise ValueError(f"mask must be one of {list(MASKS)}, got {mask!r}")
    rates: dict = {}
    for row in table["rows"]:
        if row["mask"] == mask:
            grid = rates.setdefault((row["hq"], row["hkv"], row["head_dim"]), {})
            grid[(row["sq"], row["skv"])] = (row["fwd_tflops"] * 1e12, row["fwd_bwd_tflops"] * 1e12)
    return ComputeModel(rates)
