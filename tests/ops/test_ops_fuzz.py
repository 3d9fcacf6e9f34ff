"""Fuzz the distributed ops: random world sizes, shard sizes (some empty), GQA ratios, masks, batch,
head dims and dtypes against the float64 reference. A new seed every run; a failure prints it
(re-run with ``LVX_FUZZ_SEED=<seed> pytest tests/ops/test_ops_fuzz.py``)."""

import math
import os
import random

import pytest
import torch
from cases import run_fuzz

from lvx_megatron.launch import spawn_gloo

TOLERANCE = {torch.float64: 1e-10, torch.float32: 2e-5}
SEED = int(os.environ.get("LVX_FUZZ_SEED", random.SystemRandom().randrange(1, 10**6)))


@pytest.mark.parametrize("world_size", [1, 2, 3, 5])
def test_random_problems_match_the_float64_reference(world_size):
    results = spawn_gloo(world_size, run_fuzz, SEED, 12)
    for rank, rank_results in enumerate(results):
        for case, errs in rank_results:
            for name, err in errs.items():
                where = f"LVX_FUZZ_SEED={SEED}, world {world_size}, rank {rank}: {case}"
                assert not math.isnan(err), f"NaN in {name}; {where}"
                limit = 0.0 if name == "blind_row_max" else TOLERANCE[case.dtype]
                assert err <= limit, f"{name} error {err:.3g} > {limit}; {where}"
