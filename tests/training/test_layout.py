"""Parallel-layout validation: a layout that cannot run fails at once, naming the flag."""

import pytest
from train_harness import TINY

from lvx_megatron.training.config import ConfigError, load_config
from lvx_megatron.training.layout_check import Layout, validate_layout

ELEVEN_B = TINY.parent / "llama-3.2-11b-vision.yaml"


@pytest.mark.parametrize(
    "path, overrides, world, layout",
    [
        (TINY, {}, 2, Layout(tp=1, pp=1, cp=2, dp=1)),
        (TINY, {"parallel.context_parallel_size": 1, "training.micro_batch_size": 8}, 4, Layout(1, 1, 1, 4)),
        (TINY, {"parallel.context_parallel_size": 3, "training.global_batch_size": 64}, 6, Layout(1, 1, 3, 2)),
        (ELEVEN_B, {}, 64, Layout(tp=4, pp=1, cp=2, dp=8)),
        (ELEVEN_B, {"parallel.pipeline_model_parallel_size": 4}, 32, Layout(tp=4, pp=4, cp=2, dp=1)),
    ],
)
def test_valid_layouts(path, overrides, world, layout):
    assert validate_layout(load_config(path, overrides), world) == layout


@pytest.mark.parametrize(
    "path, overrides, world, expected",
    [
        (TINY, {}, 3, "--tensor-model-parallel-size (parallel): TP 1 x PP 1 x CP 2 = 2 must divide the number"),
        (TINY, {"parallel.tensor_model_parallel_size": 3}, 6, "--tensor-model-parallel-size "),
        (ELEVEN_B, {"parallel.tensor_model_parallel_size": 16}, 32, "must divide model.text.num_query_groups (8)"),
        (ELEVEN_B, {"parallel.pipeline_model_parallel_size": 3}, 24, "--pipeline-model-parallel-size"),
        (TINY, {"parallel.context_parallel_size": 5}, 5, "--context-parallel-size (parallel.context_parallel_size): "),
        (TINY, {"parallel.context_parallel_size": 1}, 3, "--global-batch-size (training.global_batch_size): 32 must"),
        (TINY, {"model.cross_attention.ranks_per_node": 3}, 2, "(model.cross_attention.ranks_per_node): 3 must divide"),
    ],
)
def test_impossible_layouts_name_the_flag(path, overrides, world, expected):
    with pytest.raises(ConfigError) as err:
        validate_layout(load_config(path, overrides), world)
    message = str(err.value)
    assert message.startswith("config error: ") and "\n" not in message
    assert expected in message, message
