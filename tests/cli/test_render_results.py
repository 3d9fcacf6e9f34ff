"""Numbers in README.md and docs/*.md agree with the results files they quote (tools/render_results.py),
and the committed simulator results are what the simulator computes now."""

import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tools import render_results as rr

REPO = Path(__file__).resolve().parents[2]


def test_docs_agree_with_their_results_files(capsys):
    assert rr.main(["--check"]) == 0, capsys.readouterr().out
    assert sum(len(list(rr.regions(d, d.read_text()))) for d in rr.default_docs()) > 40


def test_every_results_file_a_doc_quotes_exists_and_is_named_beside_it():
    """A region's file is also linked or named in its document, so a reader can find it."""
    for doc in rr.default_docs():
        text = doc.read_text()
        for region in rr.regions(doc, text):
            words = [part for word in shlex.split(region.spec)[1:] for part in word.partition("=")[::2]]
            for name in (w for w in words if w.endswith(".json")):
                assert (rr.RESULTS / name).is_file(), (doc.name, region.line, name)
                in_markers = sum(spec.count(name) for spec in (r.spec for r in rr.regions(doc, text)))
                assert text.count(name) > in_markers, f"{doc.name}:{region.line}: link or name {name} in the text"


def test_a_number_that_disagrees_with_its_file_fails_the_check_and_is_rewritten(tmp_path, capsys):
    doc = tmp_path / "doc.md"
    region = "<!-- results: value file=xattn_memory_h100.json key=parity[run=cuda-fp32].errors.params_worst fmt=.3g -->"
    parity = json.loads((rr.RESULTS / "xattn_memory_h100.json").read_text())["parity"]
    step = f"{next(p for p in parity if p['run'] == 'cuda-fp32')['errors']['params_worst']:.3g}"
    wrong = f"{float(step) + 0.5:.3g}"
    doc.write_text(f"The worst error is {region}{wrong}<!-- /results -->.\n")
    assert rr.main([str(doc), "--check"]) == 1
    out = capsys.readouterr().out
    assert f"{doc}:1: region '{region[len('<!-- results: ') : -len(' -->')]}'" in out
    assert "benchmarks/results/xattn_memory_h100.json" in out and f"-{wrong}" in out and f"+{step}" in out
    assert rr.main([str(doc)]) == 0  # rewrite from the file
    assert doc.read_text() == f"The worst error is {region}{step}<!-- /results -->.\n"
    assert rr.main([str(doc), "--check"]) == 0


@pytest.mark.parametrize(
    "text, message",
    [
        ("x <!-- results: nope file=a.json -->1<!-- /results -->", "no renderer 'nope'"),
        ("x <!-- results: value file=xattn_memory_h100.json key=meta.dtype typo=1 -->1<!-- /results -->", "unused"),
        ("x <!-- results: value file=missing.json key=a -->1<!-- /results -->", "no results file"),
        ("x <!-- results: value file=xattn_memory_h100.json key=meta.nope -->1<!-- /results -->", "no key 'nope'"),
        (
            "<!-- results: value file=xattn_memory_h100.json key=meta.dtype -->bf16<!-- /results -->",
            "must not start a line",
        ),
        (
            "x <!-- results: value file=xattn_memory_h100.json key=memory[layers=8].peak -->1<!-- /results -->",
            "matches 4",
        ),
    ],
)
def test_a_region_that_cannot_render_is_an_error_naming_it(tmp_path, capsys, text, message):
    doc = tmp_path / "doc.md"
    doc.write_text(text + "\n")
    assert rr.main([str(doc), "--check"]) == 2
    err = capsys.readouterr().err
    assert f"{doc}:1: region" in err and message in err


def _results(tmp_path: Path, monkeypatch, name: str, data: dict) -> None:
    monkeypatch.setattr(rr, "RESULTS", tmp_path)
    monkeypatch.setattr(rr, "REPO", tmp_path)
    (tmp_path / name).write_text(json.dumps({"meta": {}, **data}))


def test_block_table_reads_rows_by_variant_mask_and_shape(tmp_path, monkeypatch):
    """A benchmark of a newer format (a mask field per row, other variants): new columns are entries."""
    rows = []
    for sq in (64, 256):
        for variant, mask, rate in (("triton", "none", 100), ("triton", "video", 80), ("fused/auto", "none", 120)):
            r = sq / 64 * rate
            row = dict(hq=32, hkv=8, head_dim=128, sq=sq, skv=16384, variant=variant, mask=mask)
            rows.append({**row, "fwd_tflops": r, "fwd_bwd_tflops": r / 2, "fwd_ms": 1.0, "fwd_bwd_ms": 1.0})
    rows.append(dict(hq=32, hkv=8, head_dim=128, sq=256, skv=16384, variant="fused/flash", error="unsupported"))
    _results(tmp_path, monkeypatch, "bench.json", {"results": rows})
    monkeypatch.setitem(rr.BLOCK_COLUMNS, "triton/video", rr.Column("triton/video", ("triton",), mask="video"))
    monkeypatch.setattr(
        rr, "BLOCK_TABLE", ("triton", "triton/video", "best-torch", ("video / best", "triton/video", "best-torch"))
    )
    table = rr.render_block_table(rr.Params(["file=bench.json"])).splitlines()
    assert table[0] == "| Hq/Hkv | Sq | Skv | triton | triton/video | best torch (f+b kernel) | video / best |"
    assert table[2] == "| 32/8 | 64 | 16K | 100 / 50 | 80 / 40 | 120 / 60 (fused/auto) | 0.67 |"
    assert table[3] == "| 32/8 | 256 | 16K | 400 / 200 | 320 / 160 | 480 / 240 (fused/auto) | 0.67 |"
    span = rr.Params(["file=bench.json", "of=triton/video", "over=triton", "metric=fwd", "fmt=.1f", "where=sq>=256"])
    assert rr.render_block_span(span) == "0.8-0.8"
    one = rr.Params(["file=bench.json", "of=triton", "stat=one", "where=sq=64", "fmt=.0f", "suffix= TFLOP/s"])
    assert rr.render_block_span(one) == "50 TFLOP/s"
    with pytest.raises(rr.RenderError, match="selects 2 shapes"):
        rr.render_block_span(rr.Params(["file=bench.json", "of=triton", "stat=one"]))


def test_peer_table_shows_the_benchmarks_best_peer_per_mask(tmp_path, monkeypatch):
    from tools import bench_block_attention as bench

    shape = dict(hq=32, hkv=8, head_dim=128, sq=256, skv=65536)
    timings = (("auto", "none", 1.0), ("sdpa/cudnn", "none", 1.25), ("auto", "all", 1.0), ("flex/fa4", "all", 2.0),
               ("auto", "segments", 0.8), ("flex", "segments", 2.4))  # fmt: skip
    visible = {"none": 1.0, "all": 1.0, "segments": 2 / 3}
    rows = [
        {**shape, "variant": v, "mask": m, "visible": visible[m], "fwd_bwd_ms": ms, "fwd_ms": ms / 3,
         "fwd_bwd_tflops": 100 * visible[m] / ms, "fwd_tflops": 300 * visible[m] / ms}
        for v, m, ms in timings
    ]  # fmt: skip
    _results(tmp_path, monkeypatch, "bench.json", {"results": rows, "summary": bench.summarize(rows)})
    table = rr.render_peer_table(rr.Params(["file=bench.json"])).splitlines()
    assert table[0] == "| Hq/Hkv | Sq | Skv | mask | visible | auto | best peer | peer | auto / peer | time / all |"
    assert table[2:] == [
        "| 32/8 | 256 | 64K | none | 100% | 100 | sdpa/cudnn | 80 | 1.25 | - |",
        "| 32/8 | 256 | 64K | all | 100% | 100 | flex/fa4 | 50 | 2.00 | 1.00 |",
        "| 32/8 | 256 | 64K | segments | 67% | 83 | flex | 28 | 3.00 | 0.80 |",
    ]


def test_tile_sweep_compares_the_tiles_the_code_picks_with_each_masks_best(tmp_path, monkeypatch):
    """The defaults come from the code (forward_config & co.), the rates from the sweep's rows."""
    import torch

    from lvx_megatron.ops.backends.triton_backend import dkdv_config, forward_config

    def row(sq, kernel, mask, cfg, waves, tflops):
        config = dict(zip(("block_m", "block_n", "num_warps", "num_stages"), cfg, strict=True))
        return dict(hq=32, hkv=8, sq=sq, skv=65536, mask=mask, kernel=kernel, config=config, waves=waves,
                    ms=1.0, tflops=tflops)  # fmt: skip

    short = forward_config(256, 128, torch.bfloat16)  # 64 tokens of 4-head groups
    short_key = (short.block_m, short.block_n, short.num_warps, short.num_stages)
    dkdv = dkdv_config(128, torch.bfloat16)
    dkdv_key = (dkdv.block_m, dkdv.block_n, dkdv.num_warps, dkdv.num_stages)
    other = (16, 16, 2, 1)  # in no default
    rows = [
        row(64, "forward", "none", short_key, short.waves, 300.0),
        row(64, "forward", "all", short_key, short.waves, 330.0),
        row(64, "forward", "none", other, 4.0, 360.0),
        row(64, "forward", "all", other, 4.0, 300.0),
        row(64, "dkdv", "none", dkdv_key, None, 200.0),
        row(64, "dkdv", "all", dkdv_key, None, 200.0),
    ]
    meta = {"head_dim": 128, "dtype": "bfloat16"}
    _results(tmp_path, monkeypatch, "sweep.json", {"meta": meta, "results": rows})
    table = rr.render_tile_sweep(rr.Params(["file=sweep.json"])).splitlines()
    assert table[0] == (
        "| Hq/Hkv | Sq | Skv | kernel | default tiles | default's TFLOP/s `none` / `all` "
        "| best on `none` | best on `all` |"
    )
    tiles = f"{short.block_m}x{short.block_n}/{short.num_warps}/{short.num_stages}, {short.waves:g} waves"
    best = "16x16/2/1, 4 waves: 360 (1.20x)"
    assert table[2] == f"| 32/8 | 64 | 64K | forward | {tiles} | 300 / 330 | {best} | the default |"
    assert table[3].endswith("| 200 / 200 | the default | the default |")
    spread = lambda stat: rr.render_tile_sweep_repeat(rr.Params(["file=sweep.json", f"stat={stat}", "fmt=.2f"]))
    assert spread("max") == "0.20"  # |360/300 - 1|
    assert spread("median") == "0.09"  # of 0.0, 0.0909, 0.2: the middle one
    with pytest.raises(rr.RenderError, match="no configuration"):
        rr.render_tile_sweep_repeat(rr.Params(["file=sweep.json", "a=none", "b=video"]))


def test_training_renderers_read_the_summary_fields(tmp_path, monkeypatch):
    summary = dict(
        step_s=2.0, visual_tokens_per_s=123456, text_tokens_per_s=999.6, tflops_per_device=250.4, mfu=0.2531,
        xattn_time_share=0.1, max_mem_gib=40.04,
    )  # fmt: skip
    _results(tmp_path, monkeypatch, "fast.json", {"summary": summary})
    _results(
        tmp_path, monkeypatch, "slow.json", {"summary": {**summary, "step_s": 3.0, "mfu": 0.2, "xattn_time_share": 0.3}}
    )
    table = rr.render_train_table(rr.Params(["fast.json=`auto`", "slow.json=`fused` (slow)"])).splitlines()
    assert table[2] == "| `auto` | 2 s | 123.5K | 1000 | 250 | 25.3% | 10.0% | 40.0 GiB |"
    assert table[3].startswith("| `fused` (slow) | 3 s |")
    text = rr.render_train_comparison(rr.Params(["fast=fast.json", "slow=slow.json", "slow_label=with fused"]))
    share = "cross-attention's share of the step 10.0% vs 30.0%"
    assert text == f"2 s instead of 3 s with fused (1.50x; MFU 25.3% vs 20.0%; {share})"


def test_gpu_check_and_gpu_test_renderers(tmp_path, monkeypatch):
    block = dict(check="block", strategy="query_ring", backend="triton", dtype="bfloat16", hq=32, hkv=8, head_dim=128)
    records = [
        {**block, "mask": "tiles", "errors": {"out": 1e-3, "dq": 4.44e-3, "blind_rows_max_abs": 0.0}, "tolerance": 2e-2,
         "passed": True},
        {**block, "mask": "none", "dtype": "float32", "errors": {"out": 3e-7}, "tolerance": 1e-4, "passed": True},
        {"check": "layer", "backend": "auto", "dtype": "bfloat16", "errors": {"out": 7e-3, "gates_worst": 0.9},
         "unjudged": ["gates_worst"], "tolerance": 5e-2, "passed": False},
    ]  # fmt: skip
    _results(tmp_path, monkeypatch, "check.json", {"results": records})
    errors = rr.render_gpu_check_errors(rr.Params(["file=check.json"]))
    assert errors == (
        "2 of 3 within tolerance; worst relative errors: block bfloat16 4.4e-3 (tolerance 2e-2), "
        "block float32 3.0e-7 (tolerance 1e-4), layer bfloat16 7.0e-3 (tolerance 5e-2)"
    )
    cases = rr.render_gpu_check_cases(rr.Params(["file=check.json"]))
    assert cases.startswith("2 block cases (strategies query_ring; backends triton; bfloat16, float32; Hq/Hkv 32/8")
    assert cases.endswith("masks none, tiles) and 1 megatron layer cases (backends auto; bfloat16)")
    _results(tmp_path, monkeypatch, "tests.json", {"counts": {"passed": 41, "failed": 0, "errors": 0, "skipped": 2}})
    assert rr.render_gpu_tests(rr.Params(["file=tests.json"])) == "41 tests pass, 2 skipped"


def test_video_decode_table_lists_the_sampling_cases(tmp_path, monkeypatch):
    case = dict(size="640x360", case="uniform 8", frames=8, seconds=0.3354, clips_per_s=2.98, sampled_fps=23.85)
    rows = [{**case, "decoded_fps": None}, {**case, "case": "all frames", "decoded_fps": 2700.0}]
    _results(tmp_path, monkeypatch, "decode.json", {"rows": rows})
    table = rr.render_video_decode_table(rr.Params(["file=decode.json"])).splitlines()
    assert table[2:] == ["| 640x360 | uniform 8 | 335 | 2.98 | 24 |"]


def _simulator_argv(command: str, output: Path) -> list[str]:
    """The recorded simulator command with its output redirected and without the plot."""
    words = shlex.split(command)[2:]
    kept = []
    for flag, value in zip(words[::2], words[1::2], strict=True):
        if flag not in ("--output", "--plot"):
            kept += [flag, value]
    return [*kept, "--output", str(output)]


@pytest.mark.parametrize("path", sorted(rr.RESULTS.glob("simulate_*.json")), ids=lambda p: p.stem)
def test_committed_simulator_results_are_what_the_simulator_computes_now(path, tmp_path):
    committed = json.loads(path.read_text())
    argv = _simulator_argv(committed["meta"]["command"], tmp_path / "now.json")
    proc = subprocess.run(
        [sys.executable, str(REPO / "tools/simulate_xattn.py"), *argv], cwd=REPO, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    now = json.loads((tmp_path / "now.json").read_text())
    rerun = f"rerun `{committed['meta']['command']}`, then python tools/render_results.py"
    assert now["report"] == committed["report"], rerun
    assert now["strategies"] == committed["strategies"], rerun


def test_a_hand_typed_number_fails_in_a_measured_section_and_a_figure_anywhere(tmp_path):
    results, roadmap, other = tmp_path / "results.md", tmp_path / "roadmap.md", tmp_path / "data.md"
    results.write_text(
        "# Results\n\nMade with 3 ranks.\n\n## GPU results\n\nA step of 12 layers.\n\n## Later\n\nOn 2 nodes.\n"
    )
    assert rr.hand_typed_figures(results, results.read_text()) == [
        f"{results}:7: '12' in 'A step of 12 layers.'"
    ]  # the measured section only: plain numbers elsewhere are words
    roadmap.write_text("# Roadmap\n\n- faster by 2 steps\n")
    assert rr.hand_typed_figures(roadmap, roadmap.read_text()) == [f"{roadmap}:3: '2' in '- faster by 2 steps'"]
    other.write_text("It takes 3.5 ms, in `4 ms` code and 2 words.\n")
    assert rr.hand_typed_figures(other, other.read_text()) == [
        f"{other}:1: '3.5 ms' in 'It takes 3.5 ms, in `4 ms` code and 2 words.'"
    ]
