"""Config validation of the cross-attention settings, and the README's megatron example runs."""

import dataclasses
import os
import socket
import subprocess
import sys

import pytest
import torch.nn.functional as F
from train_harness import TINY

from lvx_megatron.core import CrossAttentionTransformerConfig
from lvx_megatron.core.transformer_config import SECTION_FIELDS
from lvx_megatron.training import setup
from lvx_megatron.training.config import CrossAttentionSettings, load_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _config(**overrides):
    base = dict(num_layers=4, hidden_size=32, num_attention_heads=4, use_cpu_initialization=True)
    return CrossAttentionTransformerConfig(**{**base, **overrides})


@pytest.mark.parametrize(
    "overrides, match",
    [
        (
            dict(cross_attention_layers=[1, 4]),
            r"cross_attention_layers must be distinct indices in \[0, num_layers=4\)",
        ),
        (dict(cross_attention_layers=[1, 1]), r"cross_attention_layers must be distinct"),
        (
            dict(cross_attention_layers=[1], cross_attention_strategy="ulysses"),
            r"cross_attention_strategy must be .auto. or one of",
        ),
        (
            dict(cross_attention_layers=[1, 2], cross_attention_strategy=["kv_ring"]),
            r"cross_attention_strategy needs one entry per cross-attention layer "
            r"\(2: cross_attention_layers = \[1, 2\]\)",
        ),
        (dict(cross_attention_backend="tilelang"), r"cross_attention_backend must be one of"),
        (
            dict(cross_attention_strategy="hierarchical"),
            r"cross_attention_strategy 'hierarchical' needs cross_attention_ranks_per_node",
        ),
        (
            dict(context_parallel_size=4, cross_attention_ranks_per_node=3),
            r"cross_attention_ranks_per_node must be None or a positive divisor of context_parallel_size \(4\), got 3",
        ),
        (dict(cross_attention_inner_link_gbps=100.0), r"cross_attention_inner_link_gbps needs cross_attention_ranks"),
        (
            dict(cross_attention_link="measure"),
            r"cross_attention_link must be one of \['config', 'probe'\], got 'measure'",
        ),
        (
            dict(cross_attention_link="probe", cross_attention_link_gbps=25.0),
            r"cross_attention_link='probe' measures the links: leave \['cross_attention_link_gbps'\] unset",
        ),
    ],
)
def test_bad_cross_attention_config_names_the_field(overrides, match):
    with pytest.raises(ValueError, match=match):
        _config(**overrides)


def test_config_defaults_and_per_layer_strategy():
    cfg = _config(cross_attention_layers=[3, 1], cross_attention_strategy=["kv_ring", "query_ring"])
    assert cfg.cross_attention_layers == [1, 3] and cfg.visual_hidden_size == 32 and cfg.recompute_visual_kv
    assert cfg.strategy_for_layer(1) == "kv_ring" and cfg.strategy_for_layer(3) == "query_ring"
    assert _config(activation_func=F.silu).cross_attention_strategy == "auto"
    two_nodes = _config(
        context_parallel_size=4, cross_attention_strategy="hierarchical", cross_attention_ranks_per_node=2
    )
    assert two_nodes.cross_attention_link == "config" and two_nodes.strategy_for_layer(0) == "hierarchical"


# One value per setting of the run config's section model.cross_attention, none of them its default.
SECTION_VALUES = {
    "strategy": "kv_ring",
    "backend": "torch",
    "recompute_visual_kv": False,
    "gate_init": 0.25,
    "link_gbps": 3.0,
    "link_latency_us": 7.0,
    "ranks_per_node": 1,
    "inner_link_gbps": 50.0,
    "inner_link_latency_us": 2.0,
    "link": "config",
}


def test_the_run_config_section_is_made_of_the_core_config_settings():
    fields = {f.name: f for f in dataclasses.fields(CrossAttentionTransformerConfig)}
    assert set(SECTION_VALUES) == set(SECTION_FIELDS)
    section = CrossAttentionSettings()
    for name, core in SECTION_FIELDS.items():
        # One default per setting: the core config field's, the strategy's too (docs/ops.md, "Strategy settings").
        assert getattr(section, name) == fields[core].default, name
        assert CrossAttentionSettings.model_fields[name].annotation == fields[core].type, name
    given = CrossAttentionSettings(**{k: v for k, v in SECTION_VALUES.items() if k != "link"})
    cfg = _config(cross_attention_layers=[1], **given.core_fields())
    assert all(getattr(cfg, SECTION_FIELDS[k]) == v for k, v in SECTION_VALUES.items())
    # And the run's megatron config gets every one of them.
    run = load_config(TINY, {f"model.cross_attention.{k}": v for k, v in SECTION_VALUES.items()})
    built = setup.transformer_config(run)
    assert all(getattr(built, SECTION_FIELDS[k]) == v for k, v in SECTION_VALUES.items())


def _run(cmd: list[str]) -> str:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_megatron_example_runs_single_process_and_with_tp_and_cp():
    single = _run([sys.executable, "examples/megatron_block.py"])
    assert "on cpu" in single and "TP=1 CP=1" in single
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "4", "--master-port", port]
    parallel = _run([*torchrun, "examples/megatron_block.py", "--tp", "2", "--cp", "2"])
    assert "TP=2 CP=2" in parallel
