"""Llama-3.2-Vision (``model.architecture: mllama``): tiled mllama vision encoder, linear projector,
gated cross-attention layers (``models/mllama.py``)."""

from typing import Any

from ...models import mllama
from ...models.mllama_vision import VisionEncoderConfig
from ..config import FieldError, ModelConfig, RunConfig, VisionModelConfig, from_section
from .spec import (
    PROJECTED_TO_TEXT_WIDTH,
    ModelFamily,
    StageParts,
    kv_width,
    mlp_matrices,
    patches,
    reject_unused,
    with_vision_defaults,
)


def vision_config(cfg: RunConfig) -> VisionEncoderConfig:
    """The mllama vision encoder's config."""
    v = cfg.model.vision
    return from_section(VisionEncoderConfig, v, intermediate_layers_indices=list(v.intermediate_layers_indices))


def _defaults(data: dict[str, Any]) -> dict[str, Any]:
    return with_vision_defaults(data, max_num_tiles=4, norm_eps=1e-5)


def _check(m: ModelConfig) -> None:
    _check_vision(m.vision)
    x = m.cross_attention
    reject_unused(
        "mllama",
        {
            "vision.feature_layer": m.vision.feature_layer != -1,
            "perceiver": m.perceiver,
            **{f"cross_attention.{k}": getattr(x, k) for k in ("heads", "head_dim", "ff_mult")},
        },
    )


def _check_vision(v: VisionModelConfig) -> None:
    """What the mllama vision encoder needs beyond the field types (see models/mllama_vision.py)."""
    if v.num_global_layers is None:
        raise FieldError("vision.num_global_layers", "required for architecture 'mllama'")
    if v.image_size % v.patch_size:
        divisors = [d for d in range(1, v.image_size + 1) if v.image_size % d == 0]
        raise FieldError(
            "vision.patch_size",
            f"must divide vision.image_size ({v.image_size}) for architecture 'mllama': one of {divisors}, "
            f"got {v.patch_size}",
        )
    indices = v.intermediate_layers_indices
    if not indices or any(not 0 <= i < v.num_hidden_layers for i in indices):
        raise FieldError(
            "vision.intermediate_layers_indices",
            "must be a non-empty list of local vision layer indices in "
            f"[0, vision.num_hidden_layers={v.num_hidden_layers}), got {indices}",
        )


def _build(cfg: RunConfig, parts: StageParts) -> mllama.MllamaModel:
    return mllama.MllamaModel(parts, vision_config(cfg), blind_rows=cfg.model.cross_attention.blind_rows)


def _encoder_tokens_per_image(cfg: RunConfig) -> int:
    """Every tile's patches and class token, each tile padded to a multiple of 8 (as HF's encoder)."""
    tile = patches(cfg.model.vision) + 1
    return cfg.model.vision.max_num_tiles * (tile + (8 - tile % 8) % 8)


def _cross_layer_flops(cfg: RunConfig, self_layer: float, visual: int) -> float:
    """The gated cross-attention layer replaces the decoder layer (no self-attention)."""
    t, s = cfg.model.text, cfg.data.seq_length
    h, f = t.hidden_size, t.ffn_hidden_size
    mlp = 2 * mlp_matrices(t) * h * f
    return s * (2 * h * h + 2 * h * h + mlp) + 4 * s * visual * h + visual * 2 * h * 2 * kv_width(t)


def _connector_flops(cfg: RunConfig) -> float:
    """The projector reads the last layer and the intermediate layers' features."""
    v, h = cfg.model.vision, cfg.model.text.hidden_size
    visual = cfg.data.max_images * _visual_tokens_per_image(cfg)
    return visual * 2 * v.hidden_size * (1 + len(v.intermediate_layers_indices)) * h


def _cross_layer_params(cfg: RunConfig, self_layer: int) -> int:
    """The gated layer replaces the decoder layer: q, k/v, output; q/k head norms; MLP; two norms;
    two tanh gates."""
    t = cfg.model.text
    h, f, d = t.hidden_size, t.ffn_hidden_size, t.hidden_size // t.num_attention_heads
    return h * h + 2 * h * kv_width(t) + h * h + 2 * d + mlp_matrices(t) * h * f + 2 * h + 2


def _vision_params(cfg: RunConfig) -> int:
    v = cfg.model.vision
    hv, fv, tile = v.hidden_size, v.intermediate_size, patches(v) + 1
    aspect_ratios = sum(
        1 for w in range(1, v.max_num_tiles + 1) for h in range(1, v.max_num_tiles + 1) if w * h <= v.max_num_tiles
    )
    layer = 4 * hv * hv + 2 * hv * fv + hv + fv + 4 * hv  # attention (no bias), MLP with biases, two LayerNorms
    return (
        3 * v.patch_size**2 * hv  # patch embedding
        + hv  # class embedding
        + tile * hv
        + 1
        + (aspect_ratios + 1) * v.max_num_tiles * tile * hv  # gated positional
        + 2 * ((aspect_ratios + 1) * v.max_num_tiles * hv + 1)  # pre- and post-tile embeddings with gates
        + 4 * hv  # layernorm_pre, layernorm_post
        + (v.num_hidden_layers + v.num_global_layers) * layer
        + 2 * v.num_global_layers  # global layers' gates
    )


def _connector_params(cfg: RunConfig) -> int:
    v, h = cfg.model.vision, cfg.model.text.hidden_size
    return v.hidden_size * (1 + len(v.intermediate_layers_indices)) * h + h


def _visual_tokens_per_image(cfg: RunConfig) -> int:
    return mllama.visual_tokens_per_image(vision_config(cfg), cfg.model.vision.max_num_tiles)


MLLAMA = ModelFamily(
    name="mllama",
    defaults=_defaults,
    check=_check,
    build=_build,
    model_inputs=("tokens", "cross_attention_mask", "aspect_ratio_mask", "pixel_values", "aspect_ratio_ids", "labels"),
    visual_tokens_per_image=_visual_tokens_per_image,
    encoder_tokens_per_image=_encoder_tokens_per_image,
    encoder_layers=lambda cfg: cfg.model.vision.num_hidden_layers + cfg.model.vision.num_global_layers,
    dense_encoder_mask=True,  # HF's dense padding mask
    cross_layer_flops=_cross_layer_flops,
    connector_flops=_connector_flops,
    cross_layer_params=_cross_layer_params,
    vision_params=_vision_params,
    connector_params=_connector_params,
    **PROJECTED_TO_TEXT_WIDTH,
)
