"""A ``--profile`` run's phase table as a results file (and on the console).

    python tools/profile_results.py runs/single-gpu-1b/profile/rank0_phases.json --output \
        benchmarks/results/profile_1b_h200.json --command \
        "torchrun --nproc-per-node=1 pretrain_mllm.py --config examples/configs/single-gpu-1b.yaml --profile"

The results file holds the phases JSON that training/profiling.py wrote (per phase forward, backward
and total seconds per step, the step's wall time) under the provenance every results file carries.
"""

import argparse
import json
from pathlib import Path

from lvx_megatron.results import write_results
from lvx_megatron.training.profiling import phase_table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("phases", type=Path, help="a rank<R>_phases.json written by --profile")
    ap.add_argument("--command", required=True, help="the training command that made it, as quoted in the file")
    ap.add_argument("--output", help="results JSON to write")
    args = ap.parse_args()

    profiled = json.loads(args.phases.read_text())
    print(phase_table(profiled["phases"], profiled["step_s"]))
    if args.output:
        profiled.pop("trace", None)  # a path on the machine that ran it
        write_results(args.output, "profile_results.py", None, {"training_command": args.command}, **profiled)
        print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
