"""One default strategy, ``"auto"``: in the library calls, the core config and a run config."""

import dataclasses
import inspect
import math

import pytest
import torch
from cases import run_default_strategy

from lvx_megatron.core import CrossAttentionTransformerConfig
from lvx_megatron.launch import spawn_gloo
from lvx_megatron.ops import AUTO, CallOptions, distributed_cross_attention, recomputed_kv_cross_attention
from lvx_megatron.training.config import CrossAttentionSettings

TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5}


@pytest.mark.parametrize("call", [distributed_cross_attention, recomputed_kv_cross_attention])
def test_library_calls_default_to_auto(call):
    assert inspect.signature(call).parameters["strategy"].default == AUTO
    assert CallOptions().strategy == AUTO  # what prepare_call is given


def test_core_and_run_configs_default_to_auto():
    fields = {f.name: f for f in dataclasses.fields(CrossAttentionTransformerConfig)}
    assert fields["cross_attention_strategy"].default == AUTO
    assert CrossAttentionSettings().strategy == AUTO


def test_the_default_on_three_ranks_matches_the_float64_reference():
    for rank, rank_results in enumerate(spawn_gloo(3, run_default_strategy)):
        for case, errs in rank_results:
            for name, err in errs.items():
                limit = 0.0 if name == "blind_row_max" else TOLERANCE[case.dtype]
                assert not math.isnan(err) and err <= limit, f"{name} error {err:.3g} > {limit}: {case} rank {rank}"
