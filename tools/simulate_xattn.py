"""Predict what each cross-attention strategy costs on a cluster before renting it.

    python tools/simulate_xattn.py --config examples/configs/llama-3.2-11b-vision.yaml \
        --frames 64 --text-tokens 2048 --nodes 4 --gpus-per-node 4 --inter-gbps 25 --gpu a100 \
        --plot docs/images/speedup.png

All GPUs form one context-parallel group (a ring over all of them crosses nodes, so each step
waits for the slowest hop: the inter-node link when there are several nodes); ``hierarchical``
uses both links (Q all-gather inside a node, the query ring across nodes). Per strategy it prints the
predicted forward+backward time of the model's cross-attention layers per sample, the bytes one
GPU sends per layer, the peak visual K/V memory per GPU, and a step-time estimate (the rest of the
model at ``--mfu`` of the GPU's peak, split over all GPUs). The plot shows the query ring's
speedup over the KV ring as the visual/text ratio grows. Predictions come from
``lvx_megatron/ops/cost_model.py`` (its byte counts are tested against the implementation) with
the attention rates of the shipped table (``--rates`` reads another one, made by
``tools/make_rate_table.py``; ``--mask`` picks its rows).
"""

import argparse
import warnings
from pathlib import Path

warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex|absl).*")

from lvx_megatron.ops.auto import choose_strategy  # noqa: E402
from lvx_megatron.ops.cost_model import CallShape, ComputeModel, Link, Topology, uniform_lengths  # noqa: E402
from lvx_megatron.ops.hierarchical import predicted_level_bytes  # noqa: E402
from lvx_megatron.ops.rate_table import MASKS, compute_model, load_rate_table  # noqa: E402
from lvx_megatron.ops.registry import REGISTRY  # noqa: E402
from lvx_megatron.results import write_results  # noqa: E402
from lvx_megatron.training.config import load_config  # noqa: E402
from lvx_megatron.training.flops import flops_per_sample, visual_tokens_per_image  # noqa: E402

# Dense bf16 peak relative to the H100/H200 on which the attention table is measured.
GPU_SCALE = {"h100": 1.0, "h200": 1.0, "a100": 312 / 989.4}


def rates(args) -> ComputeModel:
    """The table's rows of ``--mask``, scaled to ``--gpu`` by dense peak."""
    model, factor = compute_model(load_rate_table(args.rates), args.mask), GPU_SCALE[args.gpu]
    return ComputeModel(
        {config: {k: (f * factor, b * factor) for k, (f, b) in grid.items()} for config, grid in model.rates.items()}
    )


def call_shape(cfg, text: int, visual: int, gpus: int) -> CallShape:
    t = cfg.model.text
    return CallShape(
        q_lens=uniform_lengths(text, gpus),
        kv_lens=uniform_lengths(visual, gpus),
        batch=1,
        q_heads=t.num_attention_heads,
        kv_heads=t.num_query_groups or t.num_attention_heads,
        head_dim=t.hidden_size // t.num_attention_heads,
    )


def simulate(args) -> tuple[list[tuple], dict]:
    cfg = load_config(args.config)
    gpus = args.nodes * args.gpus_per_node
    frames = args.frames or cfg.data.max_images
    text = args.text_tokens or cfg.data.seq_length
    visual = frames * visual_tokens_per_image(cfg)
    link = lambda gbps: Link(bandwidth=gbps * 1e9, latency=args.latency_us * 1e-6)
    topology = Topology(args.gpus_per_node, inner=link(args.intra_gbps), outer=link(args.inter_gbps))
    compute = rates(args)
    shape = call_shape(cfg, text, visual, gpus)
    best, predictions = choose_strategy(shape, topology, compute)
    layers = len(cfg.model.text.cross_attention_layers)
    cfg.data.max_images, cfg.data.seq_length = frames, text
    peak = 989.4e12 * GPU_SCALE[args.gpu]
    rest = flops_per_sample(cfg, 128256) / (gpus * peak * args.mfu)
    rows = []
    for name, p in predictions.items():
        xattn = layers * p.total_s
        rows.append(
            (name, xattn, p.forward_bytes + p.backward_bytes, REGISTRY[name].peak_kv_bytes(shape), xattn + rest)
        )
    meta = dict(gpus=gpus, text=text, visual=visual, frames=frames, layers=layers, best=best)
    if "hierarchical" in predictions:  # rank 0 holds the longest shards
        meta["levels"] = {k: sum(v) for k, v in predicted_level_bytes(shape, 0, args.gpus_per_node).items()}
    return rows, meta


def plot_speedup(args, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg = load_config(args.config)
    gpus = args.nodes * args.gpus_per_node
    text = args.text_tokens or cfg.data.seq_length
    compute = rates(args)
    fig, ax = plt.subplots(figsize=(6, 4))
    for gbps in sorted({args.intra_gbps, args.inter_gbps}):
        link = Link(bandwidth=gbps * 1e9, latency=args.latency_us * 1e-6)
        ratios, speedups = [], []
        for frames in (1, 2, 4, 8, 16, 32, 64, 128, 256):
            visual = frames * visual_tokens_per_image(cfg)
            _, p = choose_strategy(call_shape(cfg, text, visual, gpus), link, compute)
            ratios.append(visual / text)
            speedups.append(p["kv_ring"].total_s / p["query_ring"].total_s)
        ax.plot(ratios, speedups, marker="o", label=f"{gbps:g} GB/s ring links")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("visual tokens / text tokens per sample")
    ax.set_ylabel("query ring speedup over KV ring (fwd+bwd)")
    ax.set_title(f"{Path(args.config).stem}: {gpus} {args.gpu.upper()}s, {text} text tokens")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML run config (model dims, cross-attention layers)")
    parser.add_argument("--frames", type=int, help="frames per sample (default: data.max_images)")
    parser.add_argument("--text-tokens", type=int, help="text tokens per sample (default: data.seq_length)")
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--intra-gbps", type=float, default=150.0, help="GB/s per direction inside a node")
    parser.add_argument("--inter-gbps", type=float, default=25.0, help="GB/s per direction between nodes")
    parser.add_argument("--latency-us", type=float, default=10.0)
    parser.add_argument("--gpu", choices=sorted(GPU_SCALE), default="h100")
    parser.add_argument("--rates", help="a rate table of tools/make_rate_table.py (default: the shipped one)")
    parser.add_argument(
        "--mask", choices=MASKS, default="image", help="the table's rows: image (what the models run) or none"
    )
    parser.add_argument("--mfu", type=float, default=0.35, help="utilisation of the rest of the model")
    parser.add_argument("--plot", help="write the speedup-vs-ratio PNG here")
    parser.add_argument("--output", help="write the results JSON here (what the README's simulator quotes read)")
    args = parser.parse_args(argv)
    for name in ("nodes", "gpus_per_node"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    rows, m = simulate(args)
    links = f"links {args.intra_gbps:g} GB/s in a node"
    if args.nodes > 1:
        links += f", {args.inter_gbps:g} GB/s between nodes"
    report = [
        f"{Path(args.config).stem}: {m['frames']} frames = {m['visual']} visual tokens, {m['text']} text tokens, "
        f"{m['layers']} cross-attention layers, {m['gpus']} {args.gpu.upper()}s "
        f"({args.nodes} x {args.gpus_per_node}), {links}",
        "strategy        xattn ms/sample   MB sent/GPU/layer   peak K/V MB/GPU   step s/sample",
    ]
    for name, xattn, nbytes, kv, step in rows:
        mark = "  <- auto" if name == m["best"] else ""
        report.append(f"{name:<14}  {xattn * 1e3:15.1f}   {nbytes / 1e6:17.1f}   {kv / 1e6:15.1f}   {step:13.3f}{mark}")
    if "levels" in m:
        report.append(
            f"hierarchical sends {m['levels']['inner'] / 1e6:.1f} MB/GPU/layer inside a node and "
            f"{m['levels']['outer'] / 1e6:.1f} MB between nodes"
        )
    qr, kv = rows[0], rows[1]
    report.append(
        f"query ring vs KV ring: cross-attention {kv[1] / qr[1]:.1f}x faster, step {kv[4] / qr[4]:.2f}x faster"
    )
    print("\n".join(report))
    if args.output:
        strategies = [
            dict(strategy=name, xattn_ms=xattn * 1e3, mb_sent_per_gpu_per_layer=nbytes / 1e6,
                 peak_kv_mb_per_gpu=kv / 1e6, step_s=step, auto=name == m["best"])
            for name, xattn, nbytes, kv, step in rows
        ]  # fmt: skip
        scenario = {k: m[k] for k in ("gpus", "text", "visual", "frames", "layers")}
        scenario.update(vars(args))
        write_results(
            args.output,
            "simulate_xattn.py",
            argv,
            {"model": "a prediction of lvx_megatron/ops/cost_model.py, not a measurement"},
            scenario=scenario,
            strategies=strategies,
            levels_mb={k: v / 1e6 for k, v in m.get("levels", {}).items()},
            speedup={"xattn": kv[1] / qr[1], "step": kv[4] / qr[4]},
            report=report,
        )
    if args.plot:
        plot_speedup(args, args.plot)
        print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
