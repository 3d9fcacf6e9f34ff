"""Which (TP, PP, CP, DP) layouts of a run config fit on N GPUs, and how much memory each needs.

    python tools/plan_layout.py --config examples/configs/llama-3.2-11b-vision-long-video.yaml \
        --gpus 16 --gpus-per-node 8 --gpu-memory-gib 80 --vocab-size 128264

Prints every layout that ``pretrain_mllm.py`` would accept (TP within a node), with the estimated
memory per GPU of its busiest stage (lvx_megatron/training/memory.py), smallest first.
"""

import argparse
import warnings

warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex|absl).*")

from lvx_megatron.training.config import ConfigError, load_config  # noqa: E402
from lvx_megatron.training.layout_check import validate_layout  # noqa: E402
from lvx_megatron.training.memory import estimate_memory, parameter_counts  # noqa: E402


def divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


def plan(config: str, gpus: int, gpus_per_node: int, vocab_size: int) -> list[tuple]:
    """``(layout, estimate)`` for every valid layout of ``config`` on ``gpus`` GPUs, smallest total first."""
    rows = []
    for tp in divisors(gpus_per_node):
        for pp in divisors(gpus // tp):
            for cp in divisors(gpus // (tp * pp)):
                overrides = {
                    "parallel.tensor_model_parallel_size": tp,
                    "parallel.pipeline_model_parallel_size": pp,
                    "parallel.context_parallel_size": cp,
                }
                try:
                    cfg = load_config(config, overrides)
                    layout = validate_layout(cfg, gpus)
                except ConfigError:
                    continue
                rows.append((layout, estimate_memory(cfg, layout, vocab_size)))
    return sorted(rows, key=lambda row: row[1].total)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML run config")
    parser.add_argument("--gpus", type=int, required=True, help="GPUs of the job")
    parser.add_argument("--gpus-per-node", type=int, default=8, help="TP stays within a node")
    parser.add_argument("--gpu-memory-gib", type=float, default=80.0, help="memory of one GPU")
    parser.add_argument("--vocab-size", type=int, default=128264, help="the tokenizer's vocabulary (Llama 3.2: 128264)")
    args = parser.parse_args()
    if args.gpus < 1 or args.gpus_per_node < 1:
        parser.error("--gpus and --gpus-per-node must be >= 1")
    cfg = load_config(args.config)
    counts = parameter_counts(cfg, args.vocab_size)
    print(f"{args.config}: {sum(counts.values()) / 1e9:.2f}B parameters ({counts['vision'] / 1e9:.2f}B vision)")
    rows = plan(args.config, args.gpus, min(args.gpus_per_node, args.gpus), args.vocab_size)
    if not rows:
        print(f"no layout of {args.gpus} GPUs is valid for this config (see the errors of pretrain_mllm.py)")
        return
    head = "TP  PP  CP  DP   params  grads  optim  text act  visual  vision enc   total GiB  fits"
    print(head)
    for layout, m in rows:
        fits = "yes" if m.total <= args.gpu_memory_gib * 0.9 else "no"  # leave 10% for NCCL, allocator, context
        print(
            f"{layout.tp:>2}  {layout.pp:>2}  {layout.cp:>2}  {layout.dp:>2}  {m.parameters:7.1f}  {m.gradients:5.1f}"
            f"  {m.optimizer:5.1f}  {m.text_activations:8.2f}  {m.visual_activations:6.2f}"
            f"  {m.vision_encoder_activations:10.2f}  {m.total:10.1f}  {fits}"
        )


if __name__ == "__main__":
    main()
