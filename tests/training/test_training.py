"""pretrain_mllm.py's trainer: the same losses in every parallel layout, exact resume, config errors."""

import subprocess
import sys

import pytest
from train_harness import TINY, run_trainers, small_run, train_losses

from lvx_megatron.launch import spawn_gloo
from lvx_megatron.training.arguments import overrides_from_flags
from lvx_megatron.training.config import ConfigError, load_config

TOLERANCE = 1e-5  # fp32; reduction orders differ between layouts

LAYOUTS = {
    "tp2": {"parallel.tensor_model_parallel_size": 2},
    "cp2": {"parallel.context_parallel_size": 2},
    "pp2": {"parallel.pipeline_model_parallel_size": 2},
    "dp2": {},
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One single-process run, and on two gloo ranks: every layout, an interrupted run, resumes."""
    root = tmp_path_factory.mktemp("training")
    data = str(root / "data")
    d = lambda name: str(root / name)
    spawn_gloo(1, run_trainers, [small_run(data, d("single"))])
    two_rank = [small_run(data, d(name), **overrides) for name, overrides in LAYOUTS.items()]
    two_rank += [
        small_run(data, d("stop"), **LAYOUTS["cp2"], **{"checkpoint.save": d("ckpt"), "training.exit_interval": 2}),
        small_run(data, d("resume_cp2"), **LAYOUTS["cp2"], **{"checkpoint.load": d("ckpt")}),
        small_run(data, d("resume_tp2"), **LAYOUTS["tp2"], **{"checkpoint.load": d("ckpt")}),
        small_run(data, d("resume_pp2"), **LAYOUTS["pp2"], **{"checkpoint.load": d("ckpt")}),
    ]
    finals = spawn_gloo(2, run_trainers, two_rank)[0]
    return root, finals


def _close(a: list[float], b: list[float], tol: float) -> bool:
    return len(a) == len(b) and all(abs(x - y) <= tol * abs(y) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_every_layout_gives_the_single_process_losses(runs, layout):
    root, _ = runs
    reference = train_losses(root / "single")
    assert len(reference) == 4 and reference[-1] < reference[0]
    assert _close(train_losses(root / layout), reference, TOLERANCE), (train_losses(root / layout), reference)


def test_interrupted_run_resumes_with_the_uninterrupted_losses(runs):
    root, finals = runs
    uninterrupted = train_losses(root / "cp2")
    assert train_losses(root / "ckpt") == uninterrupted[:2]  # metrics.jsonl lives in the save dir
    assert finals[4]["stopped"] and finals[4]["iteration"] == 2
    assert (root / "ckpt" / "latest_checkpointed_iteration.txt").read_text() == "2"
    assert _close(train_losses(root / "resume_cp2"), uninterrupted[2:], 1e-6)


@pytest.mark.parametrize("layout", ["tp2", "pp2"])
def test_checkpoint_resumes_into_another_layout(runs, layout):
    root, _ = runs
    assert _close(train_losses(root / f"resume_{layout}"), train_losses(root / "cp2")[2:], TOLERANCE)


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"model.text.hidden_size": -4}, "model.text.hidden_size"),
        ({"model.text.hiden_size": 64}, "model.text.hiden_size"),
        ({"training.lr_warmup_iters": 5000}, "training"),
        ({"model.cross_attention.strategy": "ring"}, "model.cross_attention"),
        ({"model.cross_attention.strategy": "hierarchical"}, "model.cross_attention"),
        ({"model.cross_attention.link": "measure"}, "model.cross_attention.link"),
        ({"data.kind": "video"}, "data.kind"),
        ({"parallel.context_parallel_size": 0}, "parallel.context_parallel_size"),
    ],
)
def test_config_errors_are_one_line_naming_the_field(overrides, field):
    with pytest.raises(ConfigError) as err:
        load_config(TINY, overrides)
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"config error: {field}"), message


def test_unused_megatron_flag_is_an_error():
    with pytest.raises(ConfigError, match="--fp16"):
        overrides_from_flags({"config": str(TINY), "fp16": True})
    assert overrides_from_flags({"config": "x", "context_parallel_size": 2, "bf16": True}) == {
        "parallel.context_parallel_size": 2,
        "training.precision": "bf16",
    }


def test_command_line_config_error_exits_2_with_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(TINY.read_text().replace("num_attention_heads: 4", "num_attention_heads: five"))
    proc = subprocess.run(
        [sys.executable, str(TINY.parents[2] / "pretrain_mllm.py"), "--config", str(bad), "--train-iters", "3"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.startswith("config error")]
    assert len(lines) == 1 and lines[0].startswith("config error: model.text.num_attention_heads: "), proc.stderr
    assert "(got 'five')" in lines[0]


@pytest.mark.parametrize("path", sorted((TINY.parent).glob("*.yaml")), ids=lambda p: p.stem)
def test_example_configs_are_valid(path):
    cfg = load_config(path)
    assert cfg.model.text.num_layers > max(cfg.model.text.cross_attention_layers)
