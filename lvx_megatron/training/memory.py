"""Per-GPU memory of a run config in a parallel layout: parameters, optimizer, activations.

An estimate for choosing TP/CP/PP before queueing a job (``tools/plan_layout.py``), not a
measurement: it counts the model's tensors exactly and the activations with per-layer rules
(below); allocator fragmentation, NCCL buffers and the CUDA context (a few GiB) come on top.
"""

from dataclasses import dataclass

from .config import RunConfig
from .flops import visual_tokens_per_image
from .layout import Layout

GIB = 2**30


def _self_layer_params(cfg: RunConfig) -> int:
    t = cfg.model.text
    h, f, d = t.hidden_size, t.ffn_hidden_size, t.hidden_size // t.num_attention_heads
    kv = (t.num_query_groups or t.num_attention_heads) * d
    attention = h * h + 2 * h * kv + h * h + ((h + 2 * kv) if t.add_qkv_bias else 0)  # q, k and v, output
    return attention + _mlp_matrices(cfg) * h * f + 2 * h  # MLP; input and pre-MLP norms


def _mlp_matrices(cfg: RunConfig) -> int:
    return 3 if cfg.model.text.mlp == "swiglu" else 2


def _cross_layer_params(cfg: RunConfig) -> int:
    """One decoder layer at ``cross_attention_layers``."""
    m, t = cfg.model, cfg.model.text
    h, f, d = t.hidden_size, t.ffn_hidden_size, t.hidden_size // t.num_attention_heads
    kv = (t.num_query_groups or t.num_attention_heads) * d
    if m.architecture == "mllama":  # q, k/v, output; q/k head norms; MLP; two norms; two tanh gates
        return h * h + 2 * h * kv + h * h + 2 * d + _mlp_matrices(cfg) * h * f + 2 * h + 2
    if m.architecture == "openflamingo":  # the gated block before the decoder layer
        x, dv = m.cross_attention, m.vision.hidden_size
        inner = x.heads * x.head_dim
        block = 2 * 2 * h + h * inner + dv * 2 * inner + inner * h + 2 * h * x.ff_mult * h + 2
        return _self_layer_params(cfg) + block
    return _self_layer_params(cfg) + h * 2 * kv + 2 * kv + h  # hyper: visual K/V with bias, per-channel gate


def _vision_params(cfg: RunConfig) -> int:
    m, v = cfg.model, cfg.model.vision
    hv, fv = v.hidden_size, v.intermediate_size
    patches = (v.image_size // v.patch_size) ** 2
    if m.architecture != "mllama":  # the CLIP / SigLIP tower up to feature_layer (HF layout, see models/vit.py)
        clip = m.architecture == "openflamingo"
        layer = 4 * hv * hv + 4 * hv + 2 * hv * fv + fv + hv + 4 * hv  # attention and MLP with biases, two LNs
        embeddings = 3 * v.patch_size**2 * hv + (patches + 1) * hv + (3 * hv if clip else 0)  # class, pre-LN
        return embeddings + (v.num_hidden_layers + 1 + v.feature_layer) * layer
    aspect_ratios = sum(
        1 for w in range(1, v.max_num_tiles + 1) for h in range(1, v.max_num_tiles + 1) if w * h <= v.max_num_tiles
    )
    layer = 4 * hv * hv + 2 * hv * fv + hv + fv + 4 * hv  # attention (no bias), MLP with biases, two LayerNorms
    return (
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


def _connector_params(cfg: RunConfig) -> int:
    """Vision features -> ``X``: mllama's and mPLUG-Owl3's linear projector, OpenFlamingo's resampler."""
    m, h, hv = cfg.model, cfg.model.text.hidden_size, cfg.model.vision.hidden_size
    if m.architecture == "mllama":
        return hv * (1 + len(m.vision.intermediate_layers_indices)) * h + h
    if m.architecture == "mplug_owl3":
        return hv * h + h
    r = m.perceiver
    inner = r.heads * r.head_dim
    layer = 4 * hv + hv * inner + hv * 2 * inner + inner * hv + 2 * hv + 2 * hv * r.ff_mult * hv
    embeddings = (r.num_latents + (r.max_num_media or 0) + (r.max_num_frames or 0)) * hv
    return embeddings + r.depth * layer + 2 * hv


def parameter_counts(cfg: RunConfig, vocab_size: int) -> dict[str, int]:
    """Exact parameter counts: ``embedding``, ``decoder`` (all layers), ``output``, ``vision``, ``projector``.

    ``projector`` is what maps the vision features to ``X``: a linear layer (mllama, mplug_owl3) or
    the Perceiver Resampler (openflamingo).
    """
    t = cfg.model.text
    multiple = t.make_vocab_size_divisible_by
    padded_vocab = -(-vocab_size // multiple) * multiple
    n_cross = len(t.cross_attention_layers)
    decoder = (t.num_layers - n_cross) * _self_layer_params(cfg) + n_cross * _cross_layer_params(cfg)
    return {
        "embedding": padded_vocab * t.hidden_size,
        "decoder": decoder + t.hidden_size,  # + final norm
        "output": padded_vocab * t.hidden_size,
        "vision": _vision_params(cfg),
        "projector": _connector_params(cfg),
    }


def _encoder_tokens_per_image(cfg: RunConfig) -> int:
    """Tokens one image runs through the vision encoder (mllama pads each tile to a multiple of 8)."""
    v = cfg.model.vision
    patches = (v.image_size // v.patch_size) ** 2
    if cfg.model.architecture == "mllama":
        tile = patches + 1
        return v.max_num_tiles * (tile + (8 - tile % 8) % 8)
    return patches + int(cfg.model.architecture == "openflamingo")  # CLIP's class token


def _encoder_layers(cfg: RunConfig) -> int:
    v = cfg.model.vision
    if cfg.model.architecture == "mllama":
        return v.num_hidden_layers + v.num_global_layers
    return v.num_hidden_layers + 1 + v.feature_layer


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
    images = -(-d.max_images // layout.cp)
    visual_width = v.hidden_size if cfg.model.architecture == "openflamingo" else t.hidden_size
    visual = images * visual_tokens_per_image(cfg) * visual_width * width * in_flight
    vision_tokens = images * _encoder_tokens_per_image(cfg) * in_flight
    if cfg.model.freeze_vision_encoder:
        encoder = 0.0
    else:
        per_layer = (2 if v.activation_checkpointing else 34) * vision_tokens * v.hidden_size * width / 2
        encoder = _encoder_layers(cfg) * per_layer
        if cfg.model.architecture == "mllama":  # HF's dense padding mask
            encoder += images * in_flight * _encoder_tokens_per_image(cfg) ** 2 * width
    return MemoryEstimate(
        parameters=params * width / GIB,
        gradients=trainable * 4 / GIB,
        optimizer=trainable * 12 / shards / GIB,
        text_activations=text / GIB,
        visual_activations=visual / GIB,
        vision_encoder_activations=encoder / GIB,
    )
