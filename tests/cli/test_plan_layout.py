"""The layout planner: exact parameter counts, and the layouts it lists are the ones the trainer accepts."""

import subprocess
import sys

import torch
from train_harness import TINY

from lvx_megatron.models.mllama_vision import MllamaVisionEncoder
from lvx_megatron.training.config import load_config
from lvx_megatron.training.families.mllama import vision_config
from lvx_megatron.training.layout_check import Layout
from lvx_megatron.training.memory import estimate_memory, parameter_counts

CONFIGS = TINY.parent
ELEVEN_B = CONFIGS / "llama-3.2-11b-vision.yaml"


def test_parameter_counts_of_the_released_architectures():
    cfg = load_config(ELEVEN_B)
    with torch.device("meta"):
        encoder = MllamaVisionEncoder(vision_config(cfg))
    counts = parameter_counts(cfg, vocab_size=128264)
    assert counts["vision"] == sum(p.numel() for p in encoder.parameters())
    assert abs(sum(counts.values()) / 1e9 - 10.67) < 0.01  # Llama-3.2-11B-Vision: 10.67B
    ninety = parameter_counts(load_config(CONFIGS / "llama-3.2-90b-vision.yaml"), vocab_size=128264)
    assert abs(sum(ninety.values()) / 1e9 - 88.6) < 0.05  # Llama-3.2-90B-Vision: 88.6B


def test_memory_falls_with_more_model_parallelism():
    cfg = load_config(CONFIGS / "llama-3.2-11b-vision-long-video.yaml")
    one = estimate_memory(cfg, Layout(tp=1, pp=1, cp=8, dp=1), 128264)
    two = estimate_memory(cfg, Layout(tp=2, pp=1, cp=4, dp=1), 128264)
    assert two.parameters < one.parameters and two.visual_activations > one.visual_activations
    assert one.vision_encoder_activations == 0.0  # the config freezes the vision encoder


def test_plan_lists_only_valid_layouts():
    proc = subprocess.run(
        [
            sys.executable,
            str(CONFIGS.parents[1] / "tools" / "plan_layout.py"),
            "--config",
            str(ELEVEN_B),
            "--gpus",
            "8",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    rows = [line.split() for line in proc.stdout.splitlines()[2:]]
    layouts = {tuple(map(int, row[:4])) for row in rows}
    assert (4, 1, 2, 1) in layouts  # the config's own layout
    assert all(tp in (1, 2, 4, 8) and 40 % pp == 0 and tp * pp * cp * dp == 8 for tp, pp, cp, dp in layouts)
    totals = [float(row[-2]) for row in rows]
    assert totals == sorted(totals)
