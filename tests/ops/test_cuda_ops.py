"""GPU correctness (runs only where CUDA is available; CI machines have none)."""

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run on the GPU machine)")


def test_cuda_backends_and_strategies_match_float64_reference():
    from tools import gpu_check

    records = gpu_check.check_all(quick=True)
    failed = [r for r in records if not r["passed"]]
    assert not failed, failed
