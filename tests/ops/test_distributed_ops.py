"""Every strategy on 1-5 gloo ranks against the float64 dense reference."""

import math

import pytest
import torch
from cases import run_matrix

from lvx_megatron.launch import spawn_gloo
from lvx_megatron.ops import STRATEGIES

TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5}


@pytest.mark.parametrize("world_size", [1, 2, 3, 4, 5])
def test_strategies_match_float64_reference(world_size):
    results = spawn_gloo(world_size, run_matrix)
    checked = 0
    for rank, rank_results in enumerate(results):
        for case, errs in rank_results:
            for name, err in errs.items():
                assert not math.isnan(err), f"NaN in {name}: {case} rank {rank}"
                limit = 0.0 if name == "blind_row_max" else TOLERANCE[case.dtype]
                assert err <= limit, f"{name} error {err:.3g} > {limit}: {case} rank {rank}/{world_size}"
                checked += 1
    assert checked >= world_size * 18 * len(STRATEGIES) * 4
