"""Per-GPU memory of a run config in a parallel layout: parameters, optimizer, activations.

An estimate for choosing TP/CP/PP before queueing a job (``tools/plan_layout.py``), not a
measurement: it counts the model's tensors exactly and the activations with per-layer rules
(below); allocator fragmentation, NCCL buffers and the CUDA context (a few GiB) come on top.
"""

from dataclasses import dataclass

from .config import RunConfig
from .layout import Layout

GIB = 2**30


def _decoder_layer_params(cfg: RunConfig, cross: bool) -> int:
    t = cfg.model.text
    h, f, d = t.hidden_size, t.ffn_hidden_size, t.hidden_size // t.num_attention_heads
    kv = (t.num_query_groups or t.num_attention_heads) * d
    attention = h * h + 2 * h * kv + h * h  # q, k and v, output
    norms = 2 * h + (2 * d if cross else 0)  # input/pre-MLP norms; q/k head norms of cross-attention
    return attention + 3 * h * f + norms + (2 if cross else 0)  # SwiGLU MLP; the two tanh gates


def parameter_counts(cfg: RunConfig, vocab_size: int) -> dict[str, int]:
    """Exact parameter counts: ``embedding``, ``decoder`` (all layers), ``output``, ``vision``, ``projector``."""
    t, v = cfg.model.text, cfg.model.vision
    multiple = t.make_vocab_size_divisible_by
    padded_vocab = -(-vocab_size // multiple) * multiple
    n_cross = len(t.cross_attention_layers)
    decoder = (t.num_layers - n_cross) * _decoder_layer_params(cfg, False) + n_cross * _decoder_layer_params(cfg, True)
    hv, fv = v.hidden_size, v.intermediate_size
    patches = (v.image_size // v.patch_size) ** 2
    aspect_ratios = sum(
        1 for w in range(1, v.max_num_tiles + 1) for h in range(1, v.max_num_tiles + 1) if w * h <= v.max_num_tiles
    )
    layer = 4 * hv * hv + 2 * hv * fv + hv + fv + 4 * hv  # attention (no bias), MLP with biases, two LayerNorms
    vision = (
        3 * v.patch_size**2 * hv  # patch embedding
        + hv  # class embedding
        + (patches + 1) * hv
        + 1
        + (aspect_ratios + 1) * v.max_num_tiles * (patches + 1) * hv  # gated positional
        + 2 * ((aspect_ratios + 1) * v.max_num_tiles * hv + 1)  # pre- and post-tile embeddings with gates
        + 4 * hv  # layernorm_pre, layernorm_post
        + (v.num_hidden_layers + v.num_global_layers) * layer
        + 2 * v.num_global_layers  # global layers' gates
    )
    vision_out = hv * (1 + len(v.intermediate_layers_indices))
    return {
        "embedding": padded_vocab * t.hidden_size,
        "decoder": decoder + t.hidden_size,  # + final norm
        "output": padded_vocab * t.hidden_size,
        "vision": vision,
        "projector": vision_out * t.hidden_size + t.hidden_size,
    }


@dataclass
class MemoryEstimate:
    """GiB per GPU of the busiest pipeline stage (the first: it holds the vision encoder)."""

    parameters: float
    gradients: float
    optimizer: float
    text_activations: float
    visual_activations: float
    vision_encoder_activations: float

    @property
    def total(self) -> float:
        return sum(vars(self).values())


def estimate_memory(cfg: RunConfig, layout: Layout, vocab_size: int) -> MemoryEstimate:
    """Memory per GPU of the first pipeline stage.

    Parameters: the stage's decoder share and embedding split over TP (the output layer lives on the
    last stage), the vision encoder and projector whole (replicated over TP). bf16 (or fp32) weights,
    fp32 gradients, fp32 main weights + Adam moments split over DP x CP by the distributed
    optimizer. Activations per micro-batch and in-flight micro-batch (PP of them under 1F1B):
    text ~ 34 x s x h bytes per layer (megatron's rule without recomputation) split over CP and TP
    (sequence parallel), the visual features of this CP rank once (each cross-attention layer
    recomputes its K/V), and the vision encoder's ~34 x tokens x h_vision bytes per layer for this
    rank's images (inputs only with activation checkpointing; none when frozen).
    """
    t, v, d, tr = cfg.model.text, cfg.model.vision, cfg.data, cfg.training
    counts = parameter_counts(cfg, vocab_size)
    width = 2 if tr.precision == "bf16" else 4
    decoder_share = counts["decoder"] / (layout.tp * layout.pp)
    replicated = counts["vision"] + counts["projector"]
    params = decoder_share + counts["embedding"] / layout.tp + replicated
    trainable = params - (counts["vision"] if cfg.model.freeze_vision_encoder else 0)
    shards = layout.dp * layout.cp if cfg.parallel.use_distributed_optimizer else 1
    in_flight = tr.micro_batch_size * layout.pp
    text_rows = d.seq_length / layout.cp / (layout.tp if layout.tp > 1 and cfg.parallel.sequence_parallel else 1)
    text = 34 * text_rows * t.hidden_size * (t.num_layers / layout.pp) * in_flight * width / 2
    tile_tokens = (v.image_size // v.patch_size) ** 2 + 1
    padded_tile = tile_tokens + (8 - tile_tokens % 8) % 8
    images = -(-d.max_images // layout.cp)
    visual = images * v.max_num_tiles * tile_tokens * t.hidden_size * width * in_flight
    vision_tokens = images * v.max_num_tiles * padded_tile * in_flight
    if cfg.model.freeze_vision_encoder:
        encoder = 0.0
    else:
        layers = v.num_hidden_layers + v.num_global_layers
        per_layer = (2 if v.activation_checkpointing else 34) * vision_tokens * v.hidden_size * width / 2
        mask = images * in_flight * (v.max_num_tiles * padded_tile) ** 2 * width  # HF's dense padding mask
        encoder = layers * per_layer + mask
    return MemoryEstimate(
        parameters=params * width / GIB,
        gradients=trainable * 4 / GIB,
        optimizer=trainable * 12 / shards / GIB,
        text_activations=text / GIB,
        visual_activations=visual / GIB,
        vision_encoder_activations=encoder / GIB,
    )
