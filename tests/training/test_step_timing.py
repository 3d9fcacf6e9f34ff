"""Step timing: ordinary steps are timed without synchronisation, cross-attention on sampled steps only.

Work of known length stands in for the model's: it advances a fake clock that the timers read, so
what they must measure is exact whatever the machine's load (a wrong timer would add the work
around the timed code, or miss the backward).
"""

import json

import pytest
import torch
from torch import nn
from train_harness import TINY, run_trainers, small_run

from lvx_megatron.launch import spawn_gloo
from lvx_megatron.training.config import load_config
from lvx_megatron.training.flops import flops_per_sample
from lvx_megatron.training.xattn_timer import CrossAttentionTimer, StepTimer

XATTN_FWD_S, XATTN_BWD_S = 0.02, 0.01  # inside the timed module
AROUND_S = 0.05  # forward and backward of the layers before and after it
SAMPLING_COST_S = 0.1  # what a sampled step's synchronisations cost on a GPU, emulated


class _Clock:
    """Seconds that pass only when work runs (:meth:`sleep`)."""

    now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


CLOCK = _Clock()


class _Sleep(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, fwd_s: float, bwd_s: float):
        ctx.bwd_s = bwd_s
        CLOCK.sleep(fwd_s)
        return x * 1.0

    @staticmethod
    def backward(ctx, grad):
        CLOCK.sleep(ctx.bwd_s)
        return grad, None, None


class _CrossAttention(nn.Module):
    """A megatron-style module: ``forward(hidden, context)`` returns ``(output, bias)``."""

    def forward(self, hidden, context):
        return _Sleep.apply(hidden + context, XATTN_FWD_S, XATTN_BWD_S), None


class _Model(nn.Module):
    def __init__(self, cross_layers: int) -> None:
        super().__init__()
        self.cross = nn.ModuleList(_CrossAttention() for _ in range(cross_layers))

    def forward(self, x):
        x = _Sleep.apply(x, AROUND_S, AROUND_S)
        for layer in self.cross:
            x = layer(x, torch.ones(()))[0]
        return _Sleep.apply(x, AROUND_S, AROUND_S)


def _step(model: _Model) -> None:
    model(torch.ones(3, requires_grad=True)).sum().backward()


def _timer(model: _Model, sync=lambda: None) -> CrossAttentionTimer:
    return CrossAttentionTimer(model, sync, module_types=(_CrossAttention,), clock=CLOCK)


def test_cross_attention_timer_measures_forward_and_backward_of_its_modules_only():
    model = _Model(cross_layers=2)
    timer = _timer(model)
    _step(model)  # inactive: nothing measured
    assert timer.seconds == 0.0
    timer.start()
    _step(model)
    seconds = timer.stop()
    inside = 2 * (XATTN_FWD_S + XATTN_BWD_S)
    # Both layers' forward and backward (missing the backward would give 0.04), and none of the 0.2 s
    # of the layers around them.
    assert seconds == pytest.approx(inside, rel=1e-9), seconds
    _step(model)  # stopped: the total stays
    assert timer.seconds == seconds


def test_step_timer_leaves_sampled_steps_out_of_the_step_time():
    model = _Model(cross_layers=1)
    timer = _timer(model)
    steps = StepTimer(timer, sample_every=3, sync=lambda: None, clock=CLOCK)
    for iteration in range(1, 7):  # 3 and 6 are sampled
        steps.start_step(iteration)
        _step(model)
        if timer.active:
            CLOCK.sleep(SAMPLING_COST_S)
        steps.end_step()
        if iteration == 4:
            steps.pause()  # e.g. an evaluation: not a step's time
            CLOCK.sleep(0.2)
    times = steps.interval()
    ordinary = 4 * AROUND_S + XATTN_FWD_S + XATTN_BWD_S
    # Counting the sampled steps would add 0.05 s per step on average, the pause 0.05 s.
    assert times["step_s"] == pytest.approx(ordinary, rel=1e-9), times
    share = (XATTN_FWD_S + XATTN_BWD_S) / (ordinary + SAMPLING_COST_S)
    assert times["xattn_time_share"] == pytest.approx(share, rel=1e-9), times
    assert (steps.steps, steps.sampled_steps) == (0, 0)  # the interval starts afresh


def test_step_timer_synchronises_once_per_stretch_of_ordinary_steps():
    for count in (1, 5):
        syncs = []
        steps = StepTimer(_timer(_Model(0)), sample_every=0, sync=lambda syncs=syncs: syncs.append(1))
        for iteration in range(1, count + 1):
            steps.start_step(iteration)
            steps.end_step()
        assert "step_s" in steps.interval() and len(syncs) == 2  # at the start and at the log, not per step
    # A sampled step: the interval reports only the share, and the step time only the ordinary steps.
    sampled = StepTimer(_timer(_Model(1)), sample_every=1, sync=lambda: None)
    sampled.start_step(1)
    sampled.end_step()
    assert set(sampled.interval()) == {"xattn_time_share"}
    assert StepTimer(_timer(_Model(1)), sample_every=0, sync=lambda: None).interval() == {}


def test_trainer_records_rates_of_ordinary_steps_and_the_share_of_sampled_ones(tmp_path):
    overrides = {"training.log_interval": 2, "training.xattn_timing_interval": 4, "training.eval_iters": 1}
    run = small_run(str(tmp_path / "data"), str(tmp_path / "run"), **overrides)
    spawn_gloo(1, run_trainers, [run])
    records = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    train = {r["iteration"]: r for r in records if r["kind"] == "train"}
    assert sorted(train) == [2, 4]
    assert "xattn_time_share" not in train[2] and 0 < train[4]["xattn_time_share"] < 1  # iteration 4 is sampled
    cfg = load_config(TINY, run)
    flops = flops_per_sample(cfg, 32)  # the words tokenizer's vocabulary, padded to 16
    gbs = cfg.training.global_batch_size
    for record in train.values():
        step_s = record["step_s"]
        assert record["text_tokens_per_s"] == pytest.approx(gbs * cfg.data.seq_length / step_s, rel=1e-12)
        assert record["tflops_per_device"] == pytest.approx(flops * gbs / step_s / 1e12, rel=1e-12)
