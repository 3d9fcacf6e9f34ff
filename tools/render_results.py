"""Fill the marked regions of README.md and docs/*.md from the results files they quote.

A region names a renderer and its parameters; what lies between the markers is the renderer's
output, so every measured number in the docs is traceable to a file and checked against it:

    text <!-- results: value file=train_1b_h200.json key=summary.step_s fmt=.3g -->2.25<!-- /results --> s
    <!-- results: block_table file=block_attention_h100.json -->
    | Hq/Hkv | ... (a table: the start marker ends its line, the end marker starts one)
    <!-- /results -->

Parameters are ``key=value`` words (shell quoting: ``sep=" to "``); ``file`` names a file in
benchmarks/results/. An inline region must not start a line (markdown would read the comment as
an HTML block). The renderers are the functions registered with ``@renderer`` below;
docs/results.md lists them and says how to add one.

    python tools/render_results.py            # rewrite the regions from the files
    python tools/render_results.py --check    # exit 1 and show a diff where a region disagrees
"""

import argparse
import difflib
import json
import operator
import re
import shlex
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
REGION = re.compile(r"<!-- results: (?P<spec>.*?) -->(?P<body>.*?)<!-- /results -->", re.S)


class RenderError(ValueError):
    """A region that cannot be rendered: unknown renderer or parameter, missing file or key."""


def default_docs() -> list[Path]:
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


class Params:
    """A region's parameters; every one must be used (a misspelt key is an error, not a no-op)."""

    def __init__(self, words: list[str]) -> None:
        self.values: dict[str, str] = {}
        for word in words:
            key, eq, value = word.partition("=")
            if not eq:
                raise RenderError(f"parameter {word!r} is not key=value")
            self.values[key] = value
        self.used: set[str] = set()
        self.files: list[str] = []

    def get(self, key: str, default: str | None = None) -> str | None:
        self.used.add(key)
        return self.values.get(key, default)

    def require(self, key: str) -> str:
        value = self.get(key)
        if value is None:
            raise RenderError(f"missing parameter {key}=")
        return value

    def items(self) -> list[tuple[str, str]]:
        """All parameters in order (renderers whose parameters are the rows of a table)."""
        self.used.update(self.values)
        return list(self.values.items())

    def load(self, name: str) -> dict:
        """A results file of benchmarks/results/ by file name."""
        path = RESULTS / name
        if not path.is_file():
            raise RenderError(f"no results file {path.relative_to(REPO)}")
        self.files.append(str(path.relative_to(REPO)))
        return json.loads(path.read_text())

    def file(self, key: str = "file") -> dict:
        return self.load(self.require(key))

    def unused(self) -> list[str]:
        return [k for k in self.values if k not in self.used]


RENDERERS: dict[str, Callable[[Params], str]] = {}


def renderer(name: str) -> Callable[[Callable[[Params], str]], Callable[[Params], str]]:
    """Register ``fn(params) -> markdown`` as the renderer ``name``."""

    def register(fn: Callable[[Params], str]) -> Callable[[Params], str]:
        RENDERERS[name] = fn
        return fn

    return register


# --- formatting -----------------------------------------------------------------------------------


def fmt_number(value: float, spec: str) -> str:
    """``spec``: a Python format spec (``.3g``, ``.1%``, ``.0f``) or ``sci``/``sciN`` (``4.1e-6``)."""
    if spec.startswith("sci"):
        digits = int(spec[3:] or 2)
        mantissa, _, exponent = f"{value:.{digits - 1}e}".partition("e")
        return f"{mantissa}e{int(exponent)}"
    return format(value, spec)


UNITS = {"GiB": 2**30, "K": 1e3, "M": 1e6, "ms": 1e-3}


def lookup(data: object, path: str) -> object:
    """``a.b[field=value,field=value].c``: keys, and the one list element whose fields match."""
    node = data
    for part in re.findall(r"[^.\[\]]+|\[[^\]]*\]", path):
        if part.startswith("["):
            conditions = dict(c.split("=", 1) for c in part[1:-1].split(","))
            matches = [
                item
                for item in node
                if all(json.dumps(item.get(k)) == v or str(item.get(k)) == v for k, v in conditions.items())
            ]
            if len(matches) != 1:
                raise RenderError(f"{path}: {part} matches {len(matches)} elements, not one")
            node = matches[0]
        else:
            if not isinstance(node, dict) or part not in node:
                raise RenderError(f"{path}: no key {part!r}")
            node = node[part]
    return node


@renderer("value")
def render_value(p: Params) -> str:
    """One number (or string) of a file: ``file``, ``key`` (a path, see ``lookup``), ``fmt``, ``unit``."""
    value = lookup(p.file(), p.require("key"))
    if isinstance(value, str):
        return value
    unit = p.get("unit")
    if unit is not None:
        value = value / UNITS[unit]
    return fmt_number(value, p.get("fmt", ".3g")) + (unit if unit == "K" else "")


@renderer("ratio")
def render_ratio(p: Params) -> str:
    """``key`` of ``file`` over ``den_key`` of ``den_file`` (default: the same file), formatted by ``fmt``."""
    num = lookup(p.file(), p.require("key"))
    den = lookup(p.load(p.get("den_file") or p.require("file")), p.require("den_key"))
    return fmt_number(num / den, p.get("fmt", ".2f"))


# --- block attention (tools/bench_block_attention.py) ---------------------------------------------

SHAPE_FIELDS = ("hq", "hkv", "head_dim", "sq", "skv")
# torch's unmasked kernels in the benchmark; "best torch" is the fastest of them per direction.
TORCH_UNMASKED = (
    "fused/auto", "fused/flash", "fused/cudnn", "fused/efficient", "sdpa/flash", "sdpa/cudnn", "sdpa/efficient",
)  # fmt: skip


@dataclass(frozen=True)
class Column:
    """A value per shape and direction: the fastest of ``variants`` among the rows with ``mask``.

    Rows are matched by their ``variant`` and ``mask`` fields (a row without ``mask`` is unmasked),
    so a column of a new benchmark is one more entry in ``BLOCK_COLUMNS``.
    """

    header: str
    variants: tuple[str, ...]
    mask: str = "none"
    name_winner: bool = False  # show which variant was fastest forward+backward


BLOCK_COLUMNS = {
    "triton": Column("triton", ("triton",)),
    "best-torch": Column("best torch (f+b kernel)", TORCH_UNMASKED, name_winner=True),
    "auto": Column("auto", ("auto",)),
    "triton/masked": Column("triton/masked", ("triton/masked",)),
    "triton/masked skip": Column("triton/masked skip", ("triton/masked skip",)),
    "fused/masked": Column("fused/masked", ("fused/masked",)),
    "query_ring n=1": Column("query_ring n=1", ("query_ring n=1",)),
}
# The README's table: column names of BLOCK_COLUMNS, or (header, numerator, denominator) for the
# ratio of two columns' forward+backward rates.
BLOCK_TABLE: tuple[str | tuple[str, str, str], ...] = (
    "triton",
    "best-torch",
    "auto",
    ("auto / best f+b", "auto", "best-torch"),
    "triton/masked",
    "fused/masked",
    "query_ring n=1",
)


def shape_of(row: dict) -> tuple:
    return tuple(row.get(f) for f in SHAPE_FIELDS)


def block_shapes(data: dict) -> dict[tuple, list[dict]]:
    """Measured rows (not the unsupported ones) grouped by shape, in the file's order."""
    shapes: dict[tuple, list[dict]] = {}
    for row in data["results"]:
        if "error" not in row and "variant" in row:
            shapes.setdefault(shape_of(row), []).append(row)
    return shapes


def column_value(rows: list[dict], column: Column, metric: str, quantity: str = "tflops") -> tuple[float, str] | None:
    """(value, variant) of the fastest matching row for ``metric`` (fwd or fwd_bwd): its TFLOP/s, or
    with ``quantity="ms"`` its time; None if none."""
    found = [r for r in rows if r["variant"] in column.variants and r.get("mask", "none") == column.mask]
    if not found:
        return None
    best = max(found, key=lambda r: r[f"{metric}_tflops"])
    return best[f"{metric}_{quantity}"], best["variant"]


def _column(name: str) -> Column:
    """A column of BLOCK_COLUMNS, or ``variant@mask``: one variant of the benchmark on one mask."""
    if "@" in name:
        variant, mask = name.split("@", 1)
        return Column(name, (variant,), mask=mask)
    if name not in BLOCK_COLUMNS:
        raise RenderError(f"no block column {name!r} (BLOCK_COLUMNS has {', '.join(BLOCK_COLUMNS)}, or variant@mask)")
    return BLOCK_COLUMNS[name]


def _kilo(n: int) -> str:
    return f"{n // 1024}K" if n % 1024 == 0 else str(n)


@renderer("block_table")
def render_block_table(p: Params) -> str:
    """BLOCK_TABLE for every shape of ``file``: forward / forward+backward TFLOP/s per column."""
    shapes = block_shapes(p.file())
    headers = ["Hq/Hkv", "Sq", "Skv"] + [c[0] if isinstance(c, tuple) else _column(c).header for c in BLOCK_TABLE]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for shape, rows in shapes.items():
        hq, hkv, _, sq, skv = shape
        cells = [f"{hq}/{hkv}", str(sq), _kilo(skv)]
        for entry in BLOCK_TABLE:
            if isinstance(entry, tuple):
                num = column_value(rows, _column(entry[1]), "fwd_bwd")
                den = column_value(rows, _column(entry[2]), "fwd_bwd")
                cells.append(f"{num[0] / den[0]:.2f}" if num and den else "-")
                continue
            column = _column(entry)
            fwd, fwd_bwd = column_value(rows, column, "fwd"), column_value(rows, column, "fwd_bwd")
            if fwd is None or fwd_bwd is None:
                cells.append("-")
                continue
            cell = f"{fwd[0]:.0f} / {fwd_bwd[0]:.0f}"
            cells.append(cell + (f" ({fwd_bwd[1]})" if column.name_winner else ""))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


_OPS = {">=": operator.ge, "<=": operator.le, "!=": operator.ne, ">": operator.gt, "<": operator.lt, "=": operator.eq}


def shape_filter(where: str | None) -> Callable[[tuple], bool]:
    """``"sq>=1024|hkv=32"``: alternatives split by ``|``, each a ``,``-joined list of conditions."""
    if not where:
        return lambda shape: True
    alternatives = []
    for alternative in where.split("|"):
        conditions = []
        for cond in alternative.split(","):
            found = re.fullmatch(r"\s*(\w+)\s*(>=|<=|!=|>|<|=)\s*(\d+)\s*", cond)
            if not found or found.group(1) not in SHAPE_FIELDS:
                raise RenderError(f"where: bad condition {cond!r} (fields {', '.join(SHAPE_FIELDS)})")
            conditions.append((SHAPE_FIELDS.index(found.group(1)), _OPS[found.group(2)], int(found.group(3))))
        alternatives.append(conditions)
    return lambda shape: any(all(op(shape[i], v) for i, op, v in conds) for conds in alternatives)


@renderer("block_span")
def render_block_span(p: Params) -> str:
    """A column's rate (``of``; over column ``over``: their ratio) across the shapes ``where`` selects.

    Columns are names of BLOCK_COLUMNS or ``variant@mask``; ``quantity=ms`` takes times instead of
    rates; ``metric`` fwd or fwd_bwd; ``stat`` range (``lo{sep}hi``), min, max, or one (exactly one
    shape); ``overhead=yes`` subtracts 1 (a ratio as an overhead); ``fmt`` and ``suffix`` format each
    number.
    """
    shapes = block_shapes(p.file())
    metric, of, over = p.get("metric", "fwd_bwd"), _column(p.require("of")), p.get("over")
    quantity = p.get("quantity", "tflops")
    if quantity not in ("tflops", "ms"):
        raise RenderError(f"quantity must be tflops or ms, got {quantity!r}")
    keep = shape_filter(p.get("where"))
    values = []
    for shape, rows in shapes.items():
        if not keep(shape):
            continue
        num = column_value(rows, of, metric, quantity)
        den = column_value(rows, _column(over), metric, quantity) if over else (1.0, "")
        if num is None or den is None:
            raise RenderError(f"shape {shape}: no row for column {p.get('of')!r} or {over!r}")
        values.append(num[0] / den[0] - (1.0 if p.get("overhead") == "yes" else 0.0))
    if not values:
        raise RenderError(f"where={p.get('where')!r} selects no shape")
    stat, spec, suffix = p.get("stat", "range"), p.get("fmt", ".3g"), p.get("suffix", "")
    show = lambda v: fmt_number(v, spec) + suffix
    if stat == "range":
        return show(min(values)) + p.get("sep", "-") + show(max(values))
    if stat == "one" and len(values) != 1:
        raise RenderError(f"stat=one: where={p.get('where')!r} selects {len(values)} shapes")
    return show({"min": min, "max": max, "one": min}[stat](values))


MASK_TABLE_VARIANTS = ("triton", "fused", "op", "flex")  # forward+backward beside auto's fwd / f+b


@renderer("mask_table")
def render_mask_table(p: Params) -> str:
    """Per shape and mask of ``file`` (tools/bench_block_attention.py with ``mask`` rows): the share
    of visible work, ``auto``'s forward / forward+backward TFLOP/s, the other variants'
    forward+backward, and ``auto`` over unmasked ``auto``, the op over ``auto``, ``auto`` over FlexAttention."""
    headers = [
        "Hq/Hkv",
        "Sq",
        "Skv",
        "mask",
        "visible",
        "auto",
        *MASK_TABLE_VARIANTS,
        "/ unmasked",
        "op / auto",
        "/ flex",
    ]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    masks = list(dict.fromkeys(r["mask"] for r in p.file()["results"] if "mask" in r))
    if not masks:
        raise RenderError("the file has no rows with a mask field (an old-format benchmark)")
    for shape, rows in block_shapes(p.file()).items():
        hq, hkv, _, sq, skv = shape
        unmasked = column_value(rows, _column("auto@none"), "fwd_bwd")
        for mask in masks:
            value = lambda variant, metric="fwd_bwd", rows=rows, mask=mask: column_value(
                rows, _column(f"{variant}@{mask}"), metric
            )
            auto, auto_fwd = value("auto"), value("auto", "fwd")
            if auto is None:
                continue
            visible = next(r["visible"] for r in rows if r.get("mask") == mask)
            ratio = lambda num, den: f"{num[0] / den[0]:.2f}" if num and den else "-"
            cells = [f"{hq}/{hkv}", str(sq), _kilo(skv), mask, f"{visible:.0%}", f"{auto_fwd[0]:.0f} / {auto[0]:.0f}"]
            cells += [f"{v[0]:.0f}" if (v := value(variant)) else "-" for variant in MASK_TABLE_VARIANTS]
            cells += [
                ratio(auto, unmasked) if mask != "none" else "1",
                ratio(value("op"), auto),
                ratio(auto, value("flex")),
            ]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


@renderer("peer_table")
def render_peer_table(p: Params) -> str:
    """Per shape and mask of ``file`` (tools/bench_block_attention.py): the share of visible work,
    ``auto``'s forward+backward TFLOP/s, the fastest peer the benchmark found on that mask (its
    summary's ``best_peer``) and its rate, ``auto`` over that peer, and ``auto``'s time over its
    all-visible time."""
    headers = ["Hq/Hkv", "Sq", "Skv", "mask", "visible", "auto", "best peer", "peer", "auto / peer", "time / all"]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    data = p.file()
    if not data.get("summary"):
        raise RenderError("the file has no summary (a --sweep run, or one that stopped before its first shape)")
    shapes = block_shapes(data)
    for entry in data["summary"]:
        rows = next(r for shape, r in shapes.items() if (shape[0], shape[1], shape[3], shape[4]) == (
            entry["hq"], entry["hkv"], entry["sq"], entry["skv"]))  # fmt: skip
        auto_ms = {r["mask"]: r["fwd_bwd_ms"] for r in rows if r["variant"] == "auto"}
        for mask, m in entry["masks"].items():
            visible = next(r["visible"] for r in rows if r.get("mask") == mask)
            ratio = "-" if m.get("over_best_peer") is None else f"{m['over_best_peer']:.2f}"
            peer = "-" if m.get("best_peer") is None else f"{m['best_peer_tflops']:.0f}"
            over_all = f"{auto_ms[mask] / auto_ms['all']:.2f}" if "all" in auto_ms and mask != "none" else "-"
            cells = [f"{entry['hq']}/{entry['hkv']}", str(entry["sq"]), _kilo(entry["skv"]), mask, f"{visible:.0%}"]
            cells += [f"{m['auto_tflops']:.0f}", m.get("best_peer") or "-", peer, ratio, over_all]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


@renderer("block_grid")
def render_block_grid(p: Params) -> str:
    """The measured grid of ``file``: ``Sq 64-4096, Skv 16K-256K``."""
    shapes = list(block_shapes(p.file()))
    sq, skv = [s[3] for s in shapes], [s[4] for s in shapes]
    return f"Sq {min(sq)}-{max(sq)}, Skv {_kilo(min(skv))}-{_kilo(max(skv))}"


# --- the Triton tile sweep (tools/bench_block_attention.py --sweep) --------------------------------

SWEEP_KERNELS = ("forward", "dkdv", "dq")


def _default_tiles(kernel: str, rows: int, head_dim: int, dtype: str) -> tuple[tuple[int, int, int, int], float | None]:
    """The tiles (and waves; None for ``dkdv``, which does not split) the code picks now."""
    import torch  # the renderers of the other files need neither

    from lvx_megatron.ops.backends import triton_backend as tb

    dt = getattr(torch, dtype)
    cfg = {
        "forward": lambda: tb.forward_config(rows, head_dim, dt),
        "dkdv": lambda: tb.dkdv_config(head_dim, dt),
        "dq": lambda: tb.dq_config(head_dim, dt),
    }[kernel]()
    return (cfg.block_m, cfg.block_n, cfg.num_warps, cfg.num_stages), None if kernel == "dkdv" else cfg.waves


def _sweep_key(row: dict) -> tuple[tuple[int, int, int, int], float | None]:
    c = row["config"]
    return (c["block_m"], c["block_n"], c["num_warps"], c["num_stages"]), row["waves"]


def _tiles_text(key: tuple[tuple[int, int, int, int], float | None]) -> str:
    (m, n, warps, stages), waves = key
    return f"{m}x{n}/{warps}/{stages}" + ("" if waves is None else f", {waves:g} wave{'s' if waves != 1 else ''}")


def sweep_groups(data: dict) -> dict[tuple, dict[str, dict]]:
    """``(hq, hkv, sq, skv, kernel) -> mask -> {tiles key: TFLOP/s}`` of a sweep file."""
    groups: dict[tuple, dict[str, dict]] = {}
    for r in data["results"]:
        shape = (r["hq"], r["hkv"], r["sq"], r["skv"], r["kernel"])
        groups.setdefault(shape, {}).setdefault(r.get("mask", "none"), {})[_sweep_key(r)] = r["tflops"]
    order = lambda k: (k[0], k[1], k[2], k[3], SWEEP_KERNELS.index(k[4]))
    return {k: groups[k] for k in sorted(groups, key=order)}


@renderer("tile_sweep")
def render_tile_sweep(p: Params) -> str:
    """Per shape and kernel: the tiles the code picks now and their rate per mask, and each mask's best."""
    data = p.file()
    head_dim, dtype = data["meta"]["head_dim"], data["meta"]["dtype"]
    groups = sweep_groups(data)
    masks = sorted({m for by_mask in groups.values() for m in by_mask}, key=lambda m: (m != "none", m))
    header = ["Hq/Hkv", "Sq", "Skv", "kernel", "default tiles"]
    header += ["default's TFLOP/s " + " / ".join(f"`{m}`" for m in masks)]
    header += [f"best on `{m}`" for m in masks]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for (hq, hkv, sq, skv, kernel), by_mask in groups.items():
        default = _default_tiles(kernel, hq // hkv * sq, head_dim, dtype)
        rates = [by_mask.get(m, {}).get(default) for m in masks]
        cells = [f"{hq}/{hkv}", str(sq), _kilo(skv), kernel, _tiles_text(default)]
        cells.append(" / ".join("not swept" if r is None else f"{r:.0f}" for r in rates))
        for mask, rate in zip(masks, rates, strict=True):
            best = max(by_mask.get(mask, {}).items(), key=lambda kv: kv[1], default=None)
            if best is None:
                cells.append("-")
            elif best[0] == default:
                cells.append("the default")
            else:
                gain = "" if rate is None else f" ({best[1] / rate:.2f}x)"
                cells.append(f"{_tiles_text(best[0])}: {best[1]:.0f}{gain}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


@renderer("tile_sweep_repeat")
def render_tile_sweep_repeat(p: Params) -> str:
    """How far two masks' rates of the same tiles apart are (``a``, ``b``: masks, default none and all):
    ``|rate_a / rate_b - 1|`` over every swept configuration, ``stat`` median or max, ``fmt`` (``.0%``)."""
    a, b = p.get("a", "none"), p.get("b", "all")
    spread = [
        abs(by_mask[a][key] / by_mask[b][key] - 1)
        for by_mask in sweep_groups(p.file()).values()
        if a in by_mask and b in by_mask
        for key in by_mask[a]
        if key in by_mask[b]
    ]
    if not spread:
        raise RenderError(f"no configuration swept on both masks {a!r} and {b!r}")
    stat = p.get("stat", "max")
    if stat not in ("median", "max"):
        raise RenderError(f"stat must be median or max, got {stat!r}")
    value = max(spread) if stat == "max" else sorted(spread)[len(spread) // 2]
    return fmt_number(value, p.get("fmt", ".0%"))


# --- training (tools/train_summary.py) ------------------------------------------------------------

# The cross-attention share is measured on sampled steps only; a short run's summary may have none.
OPTIONAL_TRAIN_FIELDS = {"xattn_time_share": "not sampled"}
TRAIN_COLUMNS = (  # header, summary field, format
    ("step", "step_s", lambda v: f"{v:.3g} s"),
    ("visual tokens/s", "visual_tokens_per_s", lambda v: f"{v / 1e3:.1f}K"),
    ("text tokens/s", "text_tokens_per_s", lambda v: f"{v:.0f}"),
    ("TFLOP/s (model)", "tflops_per_device", lambda v: f"{v:.0f}"),
    ("MFU (989 peak)", "mfu", lambda v: f"{v:.1%}"),
    ("cross-attention share", "xattn_time_share", lambda v: f"{v:.1%}"),
    ("max memory", "max_mem_gib", lambda v: f"{v:.1f} GiB"),
)


@renderer("train_table")
def render_train_table(p: Params) -> str:
    """One row per ``FILE="label"`` parameter: a run's steady-state medians."""
    lines = ["| run | " + " | ".join(h for h, _, _ in TRAIN_COLUMNS) + " |"]
    lines.append("|" + "---|" * (len(TRAIN_COLUMNS) + 1))
    for name, label in p.items():
        summary = p.load(name)["summary"]
        missing = [f for _, f, _ in TRAIN_COLUMNS if f not in summary and f not in OPTIONAL_TRAIN_FIELDS]
        if missing:
            raise RenderError(f"{name}: summary has no {', '.join(missing)}")
        cells = [show(summary[f]) if f in summary else OPTIONAL_TRAIN_FIELDS[f] for _, f, show in TRAIN_COLUMNS]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


@renderer("train_comparison")
def render_train_comparison(p: Params) -> str:
    """Run ``fast`` against run ``slow`` (named by ``slow_label``): step times, speedup, MFU, cross-attention share."""
    fast, slow = p.file("fast")["summary"], p.file("slow")["summary"]
    label = p.get("slow_label")
    return (
        f"{fast['step_s']:.3g} s instead of {slow['step_s']:.3g} s{f' {label}' if label else ''} "
        f"({slow['step_s'] / fast['step_s']:.2f}x; MFU {fast['mfu']:.1%} vs {slow['mfu']:.1%}; "
        f"cross-attention's share of the step {fast['xattn_time_share']:.1%} vs {slow['xattn_time_share']:.1%})"
    )


# --- correctness (tools/gpu_check.py, the GPU tests) ----------------------------------------------


def _mask_kind(record: dict) -> str:
    # files written before gpu_check named mask kinds recorded a bool: random ids, or none
    if "mask" in record:
        return record["mask"]
    return "random" if record["masks"] else "none"


def _judged_errors(record: dict) -> list[float]:
    skip = set(record.get("unjudged", ()))
    return [v for k, v in record["errors"].items() if "blind" not in k and k not in skip]


@renderer("gpu_check_cases")
def render_gpu_check_cases(p: Params) -> str:
    """What the checks of ``file`` cover: strategies, backends, dtypes, heads, head dims, masks."""
    records = p.file()["results"]
    blocks = [r for r in records if r.get("check", "block") == "block"]
    layers = [r for r in records if r.get("check") == "layer"]
    heads = sorted({(r["hq"], r["hkv"]) for r in blocks}, reverse=True)
    text = (
        f"{len(blocks)} block cases (strategies {', '.join(sorted({r['strategy'] for r in blocks}))}; "
        f"backends {', '.join(sorted({r['backend'] for r in blocks}))}; "
        f"{', '.join(sorted({r['dtype'] for r in blocks}))}; Hq/Hkv {', '.join(f'{a}/{b}' for a, b in heads)}; "
        f"d {', '.join(str(d) for d in sorted({r['head_dim'] for r in blocks}))}; "
        f"masks {', '.join(sorted({_mask_kind(r) for r in blocks}))})"
    )
    if layers:
        text += (
            f" and {len(layers)} megatron layer cases (backends {', '.join(sorted({r['backend'] for r in layers}))}; "
            f"{', '.join(sorted({r['dtype'] for r in layers}))})"
        )
    return text


@renderer("gpu_check_errors")
def render_gpu_check_errors(p: Params) -> str:
    """Pass count, and per check kind and dtype the worst judged relative error and its tolerance."""
    records = p.file()["results"]
    passed = sum(r["passed"] for r in records)
    verdict = "all within tolerance" if passed == len(records) else f"{passed} of {len(records)} within tolerance"
    parts = []
    for kind in ("block", "layer"):
        mine = [r for r in records if r.get("check", "block") == kind]
        for dtype in sorted({r["dtype"] for r in mine}):
            of_dtype = [r for r in mine if r["dtype"] == dtype]
            worst = max(e for r in of_dtype for e in _judged_errors(r))
            tol = max(r["tolerance"] for r in of_dtype)
            parts.append(f"{kind} {dtype} {fmt_number(worst, 'sci')} (tolerance {fmt_number(tol, 'sci1')})")
    return f"{verdict}; worst relative errors: {', '.join(parts)}"


@renderer("gpu_tests")
def render_gpu_tests(p: Params) -> str:
    """``N tests pass`` (and how many were skipped or failed) from the GPU test stage's file."""
    counts = p.file()["counts"]
    text = f"{counts['passed']} tests pass"
    for key in ("failed", "errors", "skipped"):
        if counts.get(key):
            text += f", {counts[key]} {'skipped' if key == 'skipped' else key}"
    return text


# --- megatron block memory (tools/xattn_memory.py) -------------------------------------------------


def _memory_row(memory: list[dict], visual: int, layers: int, recompute: bool) -> dict:
    rows = [m for m in memory if (m["visual"], m["layers"], m["recompute"]) == (visual, layers, recompute)]
    if len(rows) != 1:
        raise RenderError(f"memory: {len(rows)} rows for visual {visual}, layers {layers}, recompute {recompute}")
    return rows[0]


@renderer("xattn_memory_table")
def render_xattn_memory_table(p: Params) -> str:
    """Kept-after-forward and peak memory, recompute on and off, per visual length and layer count."""
    memory = p.file()["memory"]
    lines = [
        "| visual tokens | layers | kept after forward, recompute on | off | peak fwd+bwd, on | off |",
        "|---|---|---|---|---|---|",
    ]
    for visual, layers in dict.fromkeys((m["visual"], m["layers"]) for m in memory):
        on, off = (_memory_row(memory, visual, layers, r) for r in (True, False))
        gib = lambda n: f"{n / 2**30:.2f} GiB"
        lines.append(
            f"| {visual} | {layers} | {gib(on['kept_after_forward'])} | {gib(off['kept_after_forward'])} | "
            f"{gib(on['peak'])} | {gib(off['peak'])} |"
        )
    return "\n".join(lines)


@renderer("xattn_per_layer")
def render_xattn_per_layer(p: Params) -> str:
    """Activations kept per extra layer at ``visual`` tokens: ``kind=kept`` with recompute, or
    ``kind=extra``, what turning it off adds per layer (slopes between the two largest layer counts)."""
    memory, visual = p.file()["memory"], int(p.require("visual"))
    counts = sorted({m["layers"] for m in memory if m["visual"] == visual})[-2:]

    def slope(recompute: bool) -> float:
        a, b = (_memory_row(memory, visual, n, recompute)["kept_after_forward"] for n in counts)
        return (b - a) / (counts[1] - counts[0])

    kind = p.require("kind")
    value = slope(True) if kind == "kept" else slope(False) - slope(True)
    return f"{value / 2**30:.2f} GiB"


# --- the simulator (tools/simulate_xattn.py --output) ----------------------------------------------


def wrap_command(command: str, width: int = 100) -> str:
    """A long shell command as continued lines (`` \\`` and an indent), a flag with its value."""
    groups: list[str] = []
    for word in shlex.split(command):
        quoted = shlex.quote(word)
        if groups and groups[-1].startswith("--") and " " not in groups[-1] and not word.startswith("-"):
            groups[-1] += " " + quoted
        else:
            groups.append(quoted)
    lines, line = [], "$"
    for group in groups:
        if len(line) + 1 + len(group) > width - 2 and line != "$":
            lines.append(line + " \\")
            line = "     "
        line += " " + group
    return "\n".join([*lines, line])


@renderer("simulator_output")
def render_simulator_output(p: Params) -> str:
    """The simulator's command and what it printed, as a code block."""
    data = p.file()
    return "```\n" + wrap_command(data["meta"]["command"]) + "\n" + "\n".join(data["report"]) + "\n```"


# --- the step profile (pretrain_mllm.py --profile, tools/profile_results.py) -----------------------


@renderer("rows_table")
def render_rows_table(p: Params) -> str:
    """The ``rows`` of ``file`` as a table: ``columns=key:spec,key:spec`` (a spec may be empty)."""
    from lvx_megatron.results import rows_table

    columns = [tuple(c.split(":", 1)) if ":" in c else (c, "") for c in p.require("columns").split(",")]
    return rows_table(p.file()["rows"], columns)


@renderer("profile_table")
def render_profile_table(p: Params) -> str:
    """Per phase of ``file``: forward, backward and total ms per step and share of the step's wall time."""
    from lvx_megatron.training.profiling import phase_table

    data = p.file()
    return phase_table(data["phases"], data["step_s"])


# --- the demo over seeds (tools/demo_seeds.py) --------------------------------------------------------


def _demo_run(data: dict, p: Params) -> dict:
    """The run of ``seed`` (default 1234) on the kernel set ``kernels`` (default ``default``)."""
    seed, kernels = int(p.get("seed", "1234")), p.get("kernels", "default")
    found = [r for r in data["runs"] if r["seed"] == seed and r.get("kernels", "default") == kernels]
    if len(found) != 1:
        raise RenderError(f"{len(found)} runs of seed {seed} on {kernels} kernels, not one")
    return found[0]


@renderer("demo_seeds")
def render_demo_seeds(p: Params) -> str:
    """Per seed and CPU kernel set: final held-out accuracy per question type and averaged, with the frames
    blanked, wall time and step-time spread; a chance row first."""
    data = p.file()
    qtypes = list(data["chance"]["per_type"])
    lines = [
        "| kernels | seed | " + " | ".join(f"`{t}`" for t in qtypes)
        + " | average | frames blanked | wall time | step s (median, p10-p90) |",
        "|---" * (len(qtypes) + 6) + "|",
        "| | chance | " + " | ".join(f"{data['chance']['per_type'][t]:.2f}" for t in qtypes)
        + f" | {data['chance']['accuracy']:.3f} | | | |",
    ]  # fmt: skip
    for run in data["runs"]:
        missing = [t for t in qtypes if t not in run["per_type"]]
        if missing:
            raise RenderError(f"seed {run['seed']}: no accuracy for {', '.join(missing)}")
        step, wall = run["step_s"], run["wall_s"]
        lines.append(
            f"| {run['capability']} | {run['seed']} | "
            + " | ".join(f"{run['per_type'][t]['accuracy']:.2f}" for t in qtypes)
            + f" | **{run['accuracy']:.3f}** | {run['novision_accuracy']:.3f} | {int(wall // 60)} min {wall % 60:.0f} s"
            + f" | {step['median']:.3f} ({step['p10']:.3f}-{step['p90']:.3f}) |"
        )  # fmt: skip
    return "\n".join(lines)


@renderer("demo_output")
def render_demo_output(p: Params) -> str:
    """A fenced block of one demo run's console (``seed``, ``kernels``): its first ``head`` lines, the
    lines that start with any of ``keep`` (comma-separated prefixes) and its last ``tail`` lines, with
    ``...`` where lines are left out; lines longer than ``width`` (default: no limit) end in `` ...``."""
    console = _demo_run(p.file(), p)["console"]
    head, tail = int(p.get("head", "1")), int(p.get("tail", "3"))
    width = int(p.get("width", "0"))
    cut = lambda line: line if not width or len(line) <= width else line[: width - 4].rstrip() + " ..."
    keep = tuple(prefix for prefix in p.get("keep", "").split(",") if prefix)
    shown = [i for i, line in enumerate(console) if i < head or i >= len(console) - tail or line.startswith(keep)]
    lines, last = ["```"], -1
    for i in shown:
        if i > last + 1:
            lines.append("...")
        lines.append(cut(console[i]))
        last = i
    return "\n".join([*lines, "```"])


@renderer("video_decode_table")
def render_video_decode_table(p: Params) -> str:
    """tools/bench_video_decode.py's sampling cases: per clip size and case, ms per sample, clips/s, frames/s."""
    lines = ["| clip | sampling | ms per sample | clips/s | sampled frames/s |", "|---|---|---|---|---|"]
    for row in p.file()["rows"]:
        if row["decoded_fps"] is None:  # the plain full decode is quoted on its own
            lines.append(
                f"| {row['size']} | {row['case']} | {row['seconds'] * 1000:.0f} | {row['clips_per_s']:.2f} "
                f"| {row['sampled_fps']:.0f} |"
            )
    return "\n".join(lines)


# --- documents --------------------------------------------------------------------------------------


@dataclass
class Region:
    doc: Path
    line: int  # of the start marker
    spec: str
    body: str
    marker: int  # offset of the start marker
    start: int  # offsets of the body
    end: int


def _fenced(text: str) -> list[tuple[int, int]]:
    """Offsets of the fenced code blocks (examples of regions there are not regions)."""
    spans, start, offset = [], None, 0
    for line in text.splitlines(keepends=True):
        if line.lstrip().startswith("```"):
            if start is None:
                start = offset
            else:
                spans.append((start, offset + len(line)))
                start = None
        offset += len(line)
    return spans


def regions(doc: Path, text: str) -> Iterator[Region]:
    fences = _fenced(text)
    for found in REGION.finditer(text):
        if any(a <= found.start() < b for a, b in fences):
            continue
        line = text.count("\n", 0, found.start()) + 1
        body = (found.start("body"), found.end("body"))
        yield Region(doc, line, found.group("spec"), found.group("body"), found.start(), *body)


def render_region(region: Region, text: str) -> tuple[str, list[str]]:
    """The region's new body and the results files it read."""
    where = f"{region.doc.relative_to(REPO) if region.doc.is_relative_to(REPO) else region.doc}:{region.line}"
    try:
        name, *words = shlex.split(region.spec)
        if name not in RENDERERS:
            raise RenderError(f"no renderer {name!r} (there are: {', '.join(sorted(RENDERERS))})")
        params = Params(words)
        out = RENDERERS[name](params)
        if params.unused():
            raise RenderError(f"unused parameters {', '.join(params.unused())} for {name}")
    except (RenderError, KeyError, ValueError) as err:
        raise RenderError(f"{where}: region '{region.spec}': {err}") from None
    if region.body.startswith("\n"):
        # a block: the markers stand on their own lines, blank lines keep them out of tables and lists
        return f"\n\n{out}\n\n", params.files
    if not text[text.rfind("\n", 0, region.marker) + 1 : region.marker].strip():
        raise RenderError(f"{where}: region '{region.spec}' is inline and must not start a line (markdown reads HTML)")
    if "\n" in out:
        raise RenderError(f"{where}: region '{region.spec}': {name} renders several lines; make it a block")
    return out, params.files


def render_doc(doc: Path) -> tuple[str, list[str]]:
    """The document with every region rendered, and one message per region that changed."""
    text = doc.read_text()
    pieces, changes, last = [], [], 0
    for region in regions(doc, text):
        body, files = render_region(region, text)
        pieces += [text[last : region.start], body]
        last = region.end
        if body != region.body:
            shown = doc.relative_to(REPO) if doc.is_relative_to(REPO) else doc
            diff = difflib.unified_diff(
                region.body.strip("\n").splitlines(), body.strip("\n").splitlines(), "doc", "results", lineterm=""
            )
            changes.append(
                f"{shown}:{region.line}: region '{region.spec}' disagrees with {', '.join(dict.fromkeys(files))}:\n"
                + "\n".join(diff)
            )
    pieces.append(text[last:])
    return "".join(pieces), changes


# --- hand-typed figures -----------------------------------------------------------------------------

# Sections of measurements: every number there comes from a rendered region (or names code, in
# backquotes). Elsewhere only figures with a unit are caught (a time, size, rate, share or ratio).
MEASURED_SECTIONS = {"results.md": ("GPU results",), "roadmap.md": ("*",)}
_NUMBER = r"(?<![\w.\-/])\d[\d,]*(?:\.\d+)?(?:e-?\d+)?(?:\s?-\s?\d[\d,]*(?:\.\d+)?)?"
_UNIT = (
    r"(?:ms|us|µs|s|sec|seconds?|min|minutes?|h|hours?|GiB|MiB|KiB|GB|MB|KB|TB|TFLOP/s|GFLOP/s|GB/s|MB/s"
    r"|tokens/s|it/s|times)"
)
# a number with a unit, a duration like 3m14s, or a number in scientific notation (an error, a tolerance)
FIGURE = re.compile(rf"{_NUMBER}(?:\s?{_UNIT}|%|x)(?![\w/])|(?<![\w.\-/])\d+m\d+s\b|(?<![\w.\-/])\d(?:\.\d+)?e-?\d+\b")
ANY_NUMBER = re.compile(rf"{_NUMBER}(?![\w])")
# Not prose: rendered regions and HTML comments (which may span lines), then, line by line outside
# fenced blocks, code spans, link targets and addresses.
_NOT_PROSE_BLOCKS = re.compile(r"<!-- results: .*?<!-- /results -->|<!--.*?-->", re.S)
_NOT_PROSE_INLINE = re.compile(r"``.+?``|`[^`\n]+`|\]\([^)]*\)|https?://\S+")


def _blank(match: re.Match) -> str:
    return re.sub(r"[^\n]", " ", match.group(0))  # same offsets and line numbers


def _prose(text: str) -> str:
    """``text`` with what is not prose blanked; fenced blocks with an info string (code) too, while
    plain fences (a command's output) stay: their numbers are figures."""
    out, fence = [], None
    for line in _NOT_PROSE_BLOCKS.sub(_blank, text).splitlines(keepends=True):
        stripped = line.lstrip()
        if stripped.startswith("```"):
            fence = (stripped[3:].strip() or "output") if fence is None else None
            out.append(re.sub(r"[^\n]", " ", line))
        elif fence is None:
            out.append(_NOT_PROSE_INLINE.sub(_blank, line))
        elif fence == "output":
            out.append(line)
        else:
            out.append(re.sub(r"[^\n]", " ", line))
    return "".join(out)


def _measured_lines(doc: Path, text: str) -> set[int]:
    """Line numbers of the document's measured sections (a heading's section ends at the next heading
    of its level or above)."""
    wanted = MEASURED_SECTIONS.get(doc.name, ())
    lines, inside, level = set(), False, 0
    for number, line in enumerate(text.splitlines(), 1):
        heading = re.match(r"(#+)\s+(.*)", line)
        if heading and (not inside or len(heading.group(1)) <= level):
            inside = "*" in wanted or heading.group(2).strip() in wanted
            level = len(heading.group(1))
        elif inside or ("*" in wanted and not heading):
            lines.add(number)
    return lines


def hand_typed_figures(doc: Path, text: str) -> list[str]:
    """``doc:LINE: 'figure' in '...'`` for each number not rendered from a results file: figures with a
    unit anywhere, and any number in the measured sections."""
    prose = _prose(text)
    measured = _measured_lines(doc, text)
    shown = doc.relative_to(REPO) if doc.is_relative_to(REPO) else doc
    found = []
    for number, (line, original) in enumerate(zip(prose.splitlines(), text.splitlines(), strict=True), 1):
        pattern = ANY_NUMBER if number in measured else FIGURE
        for match in pattern.finditer(line):
            context = original.strip()
            found.append(f"{shown}:{number}: {match.group(0).strip()!r} in {context[:100]!r}")
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("docs", nargs="*", type=Path, help="markdown files (default: README.md, docs/*.md)")
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 where a region disagrees")
    args = parser.parse_args(argv)
    docs = [d.resolve() for d in args.docs] or default_docs()
    all_changes = []
    try:
        for doc in docs:
            text, changes = render_doc(doc)
            all_changes += changes
            if changes and not args.check:
                doc.write_text(text)
    except RenderError as err:
        print(f"render_results: {err}", file=sys.stderr)
        return 2
    for change in all_changes:
        print(change + "\n")
    if args.check and all_changes:
        print(f"{len(all_changes)} region(s) disagree with their results files: python tools/render_results.py")
        return 1
    count = sum(len(list(regions(d, d.read_text()))) for d in docs)
    print(f"{count} regions in {len(docs)} documents {'agree' if args.check else 'rendered'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
