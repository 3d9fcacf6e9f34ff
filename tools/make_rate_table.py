"""Build the cost model's block-attention rate table from a tools/bench_block_attention.py results file.

    python tools/make_rate_table.py benchmarks/results/block_attention_h200.json

writes ``lvx_megatron/ops/rates/block_attention.json``, the table ``strategy="auto"`` reads on
GPUs (``--output`` writes elsewhere). Its ``"none"`` rows are the results' variant ``auto`` (the
per-block backend selection, what ``backend="auto"`` runs) on mask ``none``, its ``"image"`` rows
the same variant on mask ``video`` (every text token sees every frame; tile padding ids -1), the
models' image mask. ``--variant`` takes another implementation's rows instead (e.g. to simulate
``fused/masked`` with ``tools/simulate_xattn.py --rates``).

Results of the older format (rows without ``mask``) measured no real mask: their ``auto`` rows
give ``"none"``, and their ``triton/masked`` rows (the Triton kernels given an all-visible mask)
stand in for ``"image"`` (for another ``--variant``, its own rows); the table's meta says so.
"""

import argparse
import json
import sys
from pathlib import Path

from lvx_megatron.ops.rate_table import RateTableError, check_rate_table

DEFAULT_OUTPUT = Path(__file__).resolve().parents[1] / "lvx_megatron" / "ops" / "rates" / "block_attention.json"
# Result-file mask of each table mask (the current benchmark format).
RESULT_MASK = {"none": "none", "image": "video"}
# Old format: the variant measured on an all-visible mask that stands in for "image".
OLD_FORMAT_IMAGE_VARIANT = {"auto": "triton/masked"}
META_FIELDS = ("device", "torch", "cuda", "triton", "python", "date", "dtype")
REPO = Path(__file__).resolve().parents[1]


def _row(result: dict, mask: str, head_dim: int) -> dict:
    return {
        "hq": result["hq"],
        "hkv": result["hkv"],
        "head_dim": result.get("head_dim", head_dim),
        "sq": result["sq"],
        "skv": result["skv"],
        "mask": mask,
        "fwd_tflops": round(result["fwd_tflops"], 2),
        "fwd_bwd_tflops": round(result["fwd_bwd_tflops"], 2),
    }


def make_table(results: dict, source: str, variant: str = "auto") -> dict:
    """The rate table of ``variant``'s rows in a benchmark results file (``source``: its path, recorded)."""
    meta, measured = results["meta"], [r for r in results["results"] if "error" not in r]
    head_dim = meta.get("head_dim")
    old_format = not any("mask" in r for r in measured)
    if old_format:
        image_variant = OLD_FORMAT_IMAGE_VARIANT.get(variant, variant)
        picks = {"none": lambda r: r["variant"] == variant, "image": lambda r: r["variant"] == image_variant}
        image_rows = (
            f"stand-in: variant {image_variant!r} of an old-format results file, measured on an all-visible "
            "mask; regenerate from a results file with mask 'video' rows to replace it"
        )
    else:
        picks = {m: lambda r, m=m: r["variant"] == variant and r["mask"] == RESULT_MASK[m] for m in RESULT_MASK}
        image_rows = f"variant {variant!r}, mask 'video'"
    rows = [_row(r, mask, head_dim) for mask, pick in picks.items() for r in measured if pick(r)]
    rows.sort(key=lambda r: (r["mask"], r["hq"], r["hkv"], r["head_dim"], r["sq"], r["skv"]))
    table_meta = {k: meta[k] for k in META_FIELDS if k in meta}
    table_meta.update(
        benchmark_command=meta.get("command"),
        source=source,
        source_git_commit=(meta.get("git") or {}).get("commit"),
        variant=variant,
        none_rows=f"variant {variant!r}, mask 'none'",
        image_rows=image_rows,
        flops="forward 4*B*Hq*Sq*Skv*d; forward+backward 3.5x that",
        made_by=f"python tools/make_rate_table.py {source}" + (f" --variant {variant}" if variant != "auto" else ""),
    )
    return {"meta": table_meta, "rows": rows}


def dumps(table: dict) -> str:
    """The table as JSON text with one line per row (diffs of a regenerated table stay readable)."""
    rows = ",\n".join("  " + json.dumps(row) for row in table["rows"])
    return (
        '{\n "meta": '
        + json.dumps(table["meta"], indent=2).replace("\n", "\n ")
        + ',\n "rows": [\n'
        + rows
        + "\n ]\n}\n"
    )


def _recorded_path(path: str) -> str:
    """``path`` relative to the repository when it lies inside it (the table records its source)."""
    resolved = Path(path).resolve()
    return str(resolved.relative_to(REPO)) if resolved.is_relative_to(REPO) else path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", help="a results JSON of tools/bench_block_attention.py")
    parser.add_argument(
        "--output", default=str(DEFAULT_OUTPUT), help="where to write the table (default: the shipped one)"
    )
    parser.add_argument(
        "--variant", default="auto", help="the implementation whose rows make the table (default: auto)"
    )
    args = parser.parse_args()
    try:
        results = json.loads(Path(args.results).read_text())
    except (OSError, ValueError) as err:
        sys.exit(f"make_rate_table: cannot read {args.results}: {err}")
    table = make_table(results, _recorded_path(args.results), args.variant)
    try:
        check_rate_table(table, args.results)
    except RateTableError as err:
        sys.exit(f"make_rate_table: {err}")
    Path(args.output).write_text(dumps(table))
    none, image = (sum(r["mask"] == mask for r in table["rows"]) for mask in ("none", "image"))
    print(f"wrote {args.output}: {none} 'none' rows, {image} 'image' rows ({table['meta']['image_rows']})")


if __name__ == "__main__":
    main()
