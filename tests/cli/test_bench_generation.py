"""tools/bench_generation.py's command line (the timings themselves run on a GPU: docs/generation.md)."""

import pytest
import torch
from generation_harness import parse_error

from tools.bench_generation import main, parse_args


def test_frames_are_parsed_and_checked(capsys):
    assert parse_args(["--frames", "32,128"]).frames == [32, 128]
    for bad in ("32,x", "0,8"):
        assert "--frames must be comma-separated positive integers" in parse_error(
            parse_args, ["--frames", bad], capsys
        )


@pytest.mark.skipif(torch.cuda.is_available(), reason="the no-CUDA message")
def test_without_cuda_it_says_so():
    with pytest.raises(SystemExit, match="needs a CUDA device"):
        main(["--frames", "2"])
