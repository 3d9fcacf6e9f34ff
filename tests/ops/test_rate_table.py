"""The shipped block-attention rate table: what ``strategy="auto"`` reads on GPUs, and how it is made."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lvx_megatron.ops import rate_table
from lvx_megatron.ops.auto import CPU_RATE, default_compute_model
from lvx_megatron.ops.rate_table import RateTableError, compute_model, load_rate_table

REPO = Path(__file__).resolve().parents[2]
CUDA = torch.device("cuda")  # only the device type is read: no GPU needed


def _shipped_rows(mask: str, hq: int, hkv: int) -> dict[tuple[int, int], tuple[float, float]]:
    """The shipped JSON's rows, read without the package's loader."""
    table = json.loads((REPO / "lvx_megatron/ops/rates/block_attention.json").read_text())
    return {
        (r["sq"], r["skv"]): (r["fwd_tflops"] * 1e12, r["fwd_bwd_tflops"] * 1e12)
        for r in table["rows"]
        if (r["mask"], r["hq"], r["hkv"], r["head_dim"]) == (mask, hq, hkv, 128)
    }


@pytest.mark.parametrize("mask, masked", [("image", True), ("none", False)])
def test_gpu_calls_read_the_rows_of_their_mask_and_heads(mask, masked):
    """Every measured head configuration of the shipped table (Llama-3.2-11B's 32/8 and the 1B
    config's 16/8 among them) is read back exactly at its measured shapes, from its mask's rows."""
    model = default_compute_model(CUDA, masked=masked)
    shipped = json.loads((REPO / "lvx_megatron/ops/rates/block_attention.json").read_text())
    configs = sorted({(r["hq"], r["hkv"]) for r in shipped["rows"]})
    assert {(32, 8), (16, 8)} <= set(configs)
    for hq, hkv in configs:
        rows = _shipped_rows(mask, hq, hkv)
        assert rows, (hq, hkv, mask)
        for (sq, skv), rates in rows.items():
            assert model.rates_at(hq, hkv, 128, sq, skv) == pytest.approx(rates, rel=1e-12)


def test_the_cpu_path_has_a_flat_rate():
    model = default_compute_model(torch.device("cpu"), masked=True)
    assert model.flat == CPU_RATE and model.rates_at(16, 8, 128, 5, 7) == CPU_RATE


def _refusal(monkeypatch, tmp_path: Path, content: str | None) -> str:
    path = tmp_path / "block_attention.json"
    if content is not None:
        path.write_text(content)
    monkeypatch.setattr(rate_table, "shipped_table", lambda: path)
    with pytest.raises(RateTableError) as err:
        default_compute_model(CUDA, masked=True)
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"block-attention rate table {path}: "), message
    return message


def test_auto_on_a_gpu_refuses_without_its_table(monkeypatch, tmp_path):
    assert "cannot be read (No such file or directory)" in _refusal(monkeypatch, tmp_path, None)
    assert "not JSON" in _refusal(monkeypatch, tmp_path, '{"meta": {}, "rows": [')
    row = {"hq": 32, "hkv": 8, "head_dim": 128, "sq": 64, "skv": 4096, "mask": "image", "fwd_tflops": 1.0}
    message = _refusal(monkeypatch, tmp_path, json.dumps({"meta": {}, "rows": [row]}))
    assert "row 0 must have exactly the fields" in message
    row["fwd_bwd_tflops"] = 1.0
    assert "no rows with mask 'none'" in _refusal(monkeypatch, tmp_path, json.dumps({"meta": {}, "rows": [row]}))
    hole = [row, {**row, "sq": 128, "skv": 8192}, {**row, "mask": "none"}]
    message = _refusal(monkeypatch, tmp_path, json.dumps({"meta": {}, "rows": hole}))
    assert "mask 'image': rates of heads/head dim (32, 8, 128): the (sq, skv) grid lacks [(64, 8192), (128, 4096)]" in (
        message
    )


def test_an_installed_copy_reads_the_table_from_the_package(tmp_path):
    # A wheel built from the package files, installed elsewhere: package data must travel with it.
    src = tmp_path / "src"
    shutil.copytree(REPO / "lvx_megatron", src / "lvx_megatron", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    pip = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", tmp_path / "wheel", src], check=True)
    (wheel,) = (tmp_path / "wheel").glob("lvx_megatron-*.whl")
    subprocess.run([*pip, "install", "--no-deps", "--target", tmp_path / "site", wheel], check=True)
    script = (
        "import json; from lvx_megatron.ops import rate_table; "
        "print(json.dumps([str(rate_table.shipped_table()), rate_table.load_rate_table()]))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script],
        cwd=tmp_path,
        env={"PYTHONPATH": str(tmp_path / "site"), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        check=True,
    )
    where, table = json.loads(proc.stdout.splitlines()[-1])
    assert where == str(tmp_path / "site/lvx_megatron/ops/rates/block_attention.json")
    assert table == load_rate_table()


def _results(rows: list[dict], **meta) -> dict:
    return {"meta": {"device": "NVIDIA H200", "torch": "2.11", "head_dim": 128, **meta}, "results": rows}


def _bench_row(variant: str, hq: int, hkv: int, sq: int, skv: int, rate: float, mask: str | None) -> dict:
    row = dict(hq=hq, hkv=hkv, sq=sq, skv=skv, variant=variant, fwd_tflops=rate, fwd_bwd_tflops=rate / 2)
    return row if mask is None else {**row, "mask": mask}


def _make(tmp_path: Path, results: dict, *args: str) -> tuple[subprocess.CompletedProcess, Path]:
    source, out = tmp_path / "results.json", tmp_path / "table.json"
    source.write_text(json.dumps(results))
    proc = subprocess.run(
        [sys.executable, str(REPO / "tools/make_rate_table.py"), str(source), "--output", str(out), *args],
        capture_output=True,
        text=True,
    )
    return proc, out


def test_generator_takes_auto_rows_on_no_mask_and_the_video_mask(tmp_path):
    shapes = [(sq, skv) for sq in (64, 1024) for skv in (4096, 65536)]
    rows = []
    for i, (sq, skv) in enumerate(shapes):
        for heads in ((16, 8), (32, 8)):
            rows += [
                _bench_row("auto", *heads, sq, skv, 100.0 + i, "none"),
                _bench_row("auto", *heads, sq, skv, 50.0 + i, "video"),
                _bench_row("auto", *heads, sq, skv, 1.0, "interleaved"),  # other masks: not the table's
                _bench_row("triton", *heads, sq, skv, 2.0, "video"),  # other implementations: neither
            ]
    rows.append(dict(hq=16, hkv=8, sq=64, skv=4096, variant="auto", mask="tiles", error="out of memory"))
    proc, out = _make(
        tmp_path,
        _results(rows, git={"commit": "abc123", "dirty": False}, command="python tools/bench_block_attention.py"),
    )
    assert proc.returncode == 0, proc.stderr
    assert "8 'none' rows, 8 'image' rows (variant 'auto', mask 'video')" in proc.stdout
    table = load_rate_table(out)
    meta = table["meta"]
    assert (meta["device"], meta["source"], meta["source_git_commit"]) == (
        "NVIDIA H200",
        str(tmp_path / "results.json"),
        "abc123",
    )
    assert meta["benchmark_command"] == "python tools/bench_block_attention.py"
    for mask, base in (("none", 100.0), ("image", 50.0)):
        model = compute_model(table, mask)
        assert sorted(model.rates) == [(16, 8, 128), (32, 8, 128)]
        for i, (sq, skv) in enumerate(shapes):
            assert model.rates_at(16, 8, 128, sq, skv) == pytest.approx(((base + i) * 1e12, (base + i) / 2 * 1e12))


def test_generator_reads_the_old_format_with_a_stand_in_for_the_image_mask(tmp_path):
    shapes = [(sq, skv) for sq in (64, 1024) for skv in (4096, 65536)]
    rows = [
        _bench_row(v, 32, 8, sq, skv, r, None)
        for sq, skv in shapes
        for v, r in (("auto", 300.0), ("triton/masked", 200.0))
    ]
    proc, out = _make(tmp_path, _results(rows))
    assert proc.returncode == 0, proc.stderr
    table = load_rate_table(out)
    assert table["meta"]["image_rows"].startswith("stand-in: variant 'triton/masked' of an old-format results file")
    assert table["meta"]["source_git_commit"] is None
    assert compute_model(table, "none").rates_at(32, 8, 128, 64, 4096) == pytest.approx((300e12, 150e12))
    assert compute_model(table, "image").rates_at(32, 8, 128, 64, 4096) == pytest.approx((200e12, 100e12))


def test_generator_refuses_an_incomplete_table(tmp_path):
    rows = [_bench_row("auto", 32, 8, 64, 4096, 300.0, "none"), _bench_row("auto", 32, 8, 128, 8192, 300.0, "none")]
    rows.append(_bench_row("auto", 32, 8, 64, 4096, 300.0, "video"))
    proc, out = _make(tmp_path, _results(rows))
    assert proc.returncode == 1 and not out.exists()
    assert "grid lacks [(64, 8192), (128, 4096)]" in proc.stderr and str(tmp_path / "results.json") in proc.stderr
