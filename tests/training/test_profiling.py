"""The step profile (training/profiling.py): ops and their backward land in the phase of the module
that ran them, and ``--profile`` writes a trace and a phase table on every profiled rank."""

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn
from torch.profiler import ProfilerActivity, profile
from train_harness import TINY

from lvx_megatron.training.arguments import parse_command_line
from lvx_megatron.training.config import ConfigError
from lvx_megatron.training.profiling import (
    IDLE,
    MODEL_REST,
    PhaseHooks,
    StepProfiler,
    attribute,
    device_busy_seconds,
    loop_phase,
    phase_modules,
    union_seconds,
)

REPO = Path(__file__).resolve().parents[2]


class _Toy(nn.Module):
    """A big "vision encoder", a small "MLP" inside a decoder layer, and a norm outside both."""

    def __init__(self) -> None:
        super().__init__()
        self.vision_model = nn.Sequential(nn.Linear(384, 384), nn.GELU(), nn.Linear(384, 384))
        self.decoder = nn.ModuleDict({"mlp": nn.Linear(384, 8)})
        self.norm = nn.LayerNorm(8)

    def forward(self, x):
        return self.norm(self.decoder["mlp"](self.vision_model(x))).square().mean()


def test_phase_modules_follow_the_model_families_names():
    found = phase_modules(_Toy())
    assert [p for p, _ in found] == ["vision encoder", "text MLP"]  # the vision encoder's Linears not again


def _profiled_toy_steps(tmp_path, steps=4, start=1, end=3, device="cpu"):
    torch.manual_seed(0)
    model = _Toy().to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    profiler = StepProfiler(model, start, end, tmp_path, rank=0, device=torch.device(device))
    summaries = []
    for finished in range(steps):
        profiler.before_step(finished)
        model(torch.randn(1024, 384, device=device)).backward()
        with loop_phase("optimizer"):
            optimizer.step()
        optimizer.zero_grad()
        summaries.append(profiler.after_step(finished + 1))
    return model, summaries


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_the_gpu_profile_times_kernels_and_the_device_idle_time(tmp_path):
    _, summaries = _profiled_toy_steps(tmp_path, device="cuda")
    summary = summaries[2]
    phases = summary["phases"]
    assert summary["time_source"] == "device kernels"
    assert phases["vision encoder"]["forward"] > 0 and phases["vision encoder"]["backward"] > 0
    # tiny kernels launched from Python: the device waits on the host for part of the step
    assert 0 < phases[IDLE]["total"] < summary["step_s"]


def test_backward_ops_inherit_the_phase_of_the_forward_op_that_made_them():
    model = _Toy()
    hooks = PhaseHooks(model)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        model(torch.randn(8, 384)).backward()
    hooks.remove()
    matmuls = Counter((phase, direction) for e, phase, direction in attribute(prof.events()) if e.name == "aten::mm")
    # Backward: the vision encoder's second Linear takes two matmuls (input and weight gradient), its first
    # one (no input gradient) one; the MLP two. Forward Linears run addmm, not mm.
    assert matmuls == {("vision encoder", "backward"): 3, ("text MLP", "backward"): 2}, matmuls


def test_the_profile_covers_the_configured_iterations_and_writes_its_files(tmp_path):
    _, summaries = _profiled_toy_steps(tmp_path)
    assert [s is not None for s in summaries] == [False, False, True, False]  # after iteration 3 only
    summary = summaries[2]
    phases = summary["phases"]
    assert summary["iterations"] == [2, 3] and summary["time_source"] == "CPU self time"
    # 2 x 384^2 against 384 x 8 multiply-adds per row: even on a busy machine the encoder's time dominates
    assert phases["vision encoder"]["total"] > phases["text MLP"]["total"]
    assert phases["vision encoder"]["backward"] > 0 and phases[MODEL_REST]["forward"] > 0
    assert phases["optimizer"]["total"] > 0
    written = json.loads((tmp_path / "rank0_phases.json").read_text())
    assert written["phases"] == phases and written["step_s"] == summary["step_s"]
    assert json.loads((tmp_path / "rank0_trace.json").read_text())["traceEvents"]
    assert "| vision encoder |" in summary["table"] and "| step (wall) |" in summary["table"]


def test_device_busy_time_is_the_union_of_the_work_intervals():
    # overlapping kernels on two streams count once; a gap counts nothing; empty events nothing
    assert union_seconds([(0, 10), (5, 10), (30, 5), (31, 1), (50, 0)]) == pytest.approx(20e-9)
    assert union_seconds([]) == 0


def test_device_busy_time_reads_the_exported_trace(tmp_path):
    # µs timestamps as torch exports them; the device-side annotation range spans idle time too
    events = [
        {"ph": "X", "cat": "kernel", "name": "gemm", "ts": 100.0, "dur": 10.0},
        {"ph": "X", "cat": "gpu_memcpy", "name": "HtoD", "ts": 105.0, "dur": 10.0},
        {"ph": "X", "cat": "gpu_memset", "name": "zero", "ts": 200.0, "dur": 2.5},
        {"ph": "X", "cat": "gpu_user_annotation", "name": "lvx_phase::vision encoder", "ts": 0.0, "dur": 500.0},
        {"ph": "X", "cat": "cpu_op", "name": "aten::mm", "ts": 90.0, "dur": 50.0},
        {"ph": "i", "cat": "kernel", "name": "marker", "ts": 300.0},
    ]
    trace = tmp_path / "trace.json"
    trace.write_text(json.dumps({"traceEvents": events}))
    assert device_busy_seconds(trace) == pytest.approx(17.5e-6)


def test_profile_step_range_is_checked_against_train_iters():
    with pytest.raises(ConfigError, match="profile_step_end"):
        parse_command_line(["--config", str(TINY), "--profile", "--profile-step-start", "4", "--profile-step-end", "4"])
    cfg = parse_command_line(["--config", str(TINY), "--use-pytorch-profiler", "--profile-ranks", "0", "1"]).cfg
    assert cfg.training.profile and cfg.training.profile_ranks == [0, 1]


def test_profile_flag_writes_a_trace_and_phase_table_per_rank(tmp_path):
    cfg = yaml.safe_load(TINY.read_text())
    cfg["data"].update(path=str(tmp_path / "data"), train_samples=64, eval_samples=16)
    cfg["training"].update(train_iters=5, lr_warmup_iters=1, eval_interval=0, eval_iters=1, log_interval=5)
    cfg["training"]["micro_batch_size"] = 4
    cfg["training"]["global_batch_size"] = 4
    cfg["checkpoint"] = {"save": None, "load": None, "save_interval": 0}
    cfg["logging"].update(run_dir=str(tmp_path / "run"), wandb_mode="disabled")
    config = tmp_path / "cfg.yaml"
    config.write_text(yaml.safe_dump(cfg))
    profile = ["--profile", "--profile-step-start", "2", "--profile-step-end", "4", "--profile-ranks", "0", "1"]
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "lvx_megatron.torchrun",
            "--nproc-per-node=2",
            "pretrain_mllm.py",
            "--config",
            config,
            *profile,
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for rank in (0, 1):
        summary = json.loads((tmp_path / "run" / "profile" / f"rank{rank}_phases.json").read_text())
        assert summary["iterations"] == [3, 4]
        phases = summary["phases"]
        for phase in ("vision encoder", "projector", "cross-attention", "text self-attention", "text MLP", "LM head"):
            assert phases[phase]["forward"] > 0 and phases[phase]["backward"] > 0, (rank, phase, phases)
        assert phases["communication"]["total"] > 0  # the CP ring over gloo
        assert phases["optimizer"]["total"] > 0 and phases["data"]["total"] > 0
        assert (tmp_path / "run" / "profile" / f"rank{rank}_trace.json").is_file()
    assert "[profile rank 0] iterations 3-4" in proc.stdout and "| cross-attention |" in proc.stdout
