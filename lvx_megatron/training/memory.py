"""Per-GPU memory of a run config in a parallel layout: parameters, optimizer, activations.

An estimate for choosing TP/CP/PP before queueing a job (``tools/plan_layout.py``), not a
measurement: it counts the model's tensors exactly and the activations with per-layer rules
(below); allocator fragmentation, NCCL buffers and the CUDA context (a few GiB) come on top.
"""

from dataclasses import dataclass

from .config import RunConfig
from .families import family
from .families.spec import kv_width, mlp_matrices
from .layout_check import Layout

GIB = 2**30


def _self_layer_params(cfg: RunConfig) -> int:
    t = cfg.model.text
    h, f, kv = t.hidden_size, t.ffn_hidden_size, kv_width(t)
    attention = h * h + 2 * h * kv + h * h + ((h + 2 * kv) if t.add_qkv_bias else 0)  # q, k and v, output
    return attention + mlp_matrices(t) * h * f + 2 * h  # MLP; input and pre-MLP norms


def parameter_counts(cfg: RunConfig, vocab_size: int) -> dict[str, int]:
    """Exact parameter counts: ``embedding``, ``decoder`` (all layers), ``output``, ``vision``, ``projector``.

    ``projector`` is what maps the vision features to ``X``: a linear layer (mllama, mplug_owl3) or
    the Perceiver Resampler (openflamingo).
    """
    t, spec = cfg.model.text, family(cfg)
    multiple = t.make_vocab_size_divisible_by
    padded_vocab = -(-vocab_size // multiple) * multiple
    n_cross = len(t.cross_attention_layers)
    self_layer = _self_layer_params(cfg)
    decoder = (t.num_layers - n_cross) * self_layer + n_cross * spec.cross_layer_params(cfg, self_layer)
    return {
        "embedding": padded_vocab * t.hidden_size,
        "decoder": decoder + t.hidden_size,  # + final norm
        "output": padded_vocab * t.hidden_size,
        "vision": spec.vision_params(cfg),
        "projector": spec.connector_params(cfg),
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
    rank's images (inputs only with activation checkpointing; none when frozen; OpenFlamingo's
    resampler, a few small layers over the same tokens, is not counted).
    """
    t, v, d, tr, spec = cfg.model.text, cfg.model.vision, cfg.data, cfg.training, family(cfg)
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
    images = -(-d.max_images // layout.cp)
    visual = images * spec.visual_tokens_per_image(cfg) * spec.visual_width(cfg) * width * in_flight
    vision_tokens = images * spec.encoder_tokens_per_image(cfg) * in_flight
    if cfg.model.freeze_vision_encoder:
        encoder = 0.0
    else:
        per_layer = (2 if v.activation_checkpointing else 34) * vision_tokens * v.hidden_size * width / 2
        encoder = spec.encoder_layers(cfg) * per_layer
        if spec.dense_encoder_mask:
            encoder += images * in_flight * spec.encoder_tokens_per_image(cfg) ** 2 * width
    return MemoryEstimate(
        parameters=params * width / GIB,
        gradients=trainable * 4 / GIB,
        optimizer=trainable * 12 / shards / GIB,
        text_activations=text / GIB,
        visual_activations=visual / GIB,
        vision_encoder_activations=encoder / GIB,
    )
