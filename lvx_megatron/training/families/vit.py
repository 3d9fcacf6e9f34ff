"""What the two ViT-tower families (openflamingo: CLIP, mplug_owl3: SigLIP) share: one tile per image,
the tower's config, checks and sizes (``models/vit.py``)."""

from typing import Any, Literal

from ...models.vit import ViTConfig
from ..config import FieldError, ModelConfig, RunConfig, from_section
from .spec import patches

Kind = Literal["clip", "siglip"]


def vit_config(cfg: RunConfig, kind: Kind) -> ViTConfig:
    """The CLIP or SigLIP tower's config."""
    return from_section(ViTConfig, cfg.model.vision, kind=kind)


def check_vit(m: ModelConfig, architecture: str) -> None:
    """Raise ``FieldError`` for what the towers need beyond the field types."""
    v = m.vision
    if v.max_num_tiles != 1:
        raise FieldError("vision.max_num_tiles", f"must be 1 for architecture {architecture!r} (one tile per image)")
    # Not necessarily a divisor: SigLIP so400m-patch14-384 drops the last 6 pixels.
    if v.patch_size > v.image_size:
        raise FieldError("vision.patch_size", f"must be in [1, vision.image_size={v.image_size}], got {v.patch_size}")
    if v.feature_layer < -v.num_hidden_layers:
        raise FieldError(
            "vision.feature_layer",
            f"must be in [-vision.num_hidden_layers, -1] = [{-v.num_hidden_layers}, -1], got {v.feature_layer}",
        )


def unused_by_towers(m: ModelConfig) -> dict[str, object]:
    """The fields only mllama reads (for ``reject_unused``)."""
    return {
        "vision.num_global_layers": m.vision.num_global_layers is not None,
        "vision.intermediate_layers_indices": m.vision.intermediate_layers_indices,
        "cross_attention.blind_rows": m.cross_attention.blind_rows != "zero",
    }


def encoder_layers(cfg: RunConfig) -> int:
    """Layers run to reach ``hidden_states[feature_layer]``."""
    v = cfg.model.vision
    return v.num_hidden_layers + 1 + v.feature_layer


def encoder_tokens_per_image(cfg: RunConfig, kind: Kind) -> int:
    """The patches, plus CLIP's class token."""
    return patches(cfg.model.vision) + int(kind == "clip")


def vision_params(cfg: RunConfig, kind: Kind) -> int:
    """The tower up to ``feature_layer`` (HF layout, see models/vit.py)."""
    v = cfg.model.vision
    hv, fv = v.hidden_size, v.intermediate_size
    layer = 4 * hv * hv + 4 * hv + 2 * hv * fv + fv + hv + 4 * hv  # attention and MLP with biases, two LNs
    # Positions (and CLIP's class token) or the patch convolution's bias; CLIP: class embedding, pre-LN.
    embeddings = 3 * v.patch_size**2 * hv + (patches(v) + 1) * hv + (3 * hv if kind == "clip" else 0)
    return embeddings + encoder_layers(cfg) * layer


def tower_terms(kind: Kind) -> dict[str, Any]:
    """The :class:`~.spec.ModelFamily` fields both tower families fill the same way: their batch
    inputs and the tower's FLOP and parameter terms."""
    return dict(
        model_inputs=("tokens", "image_positions", "pixel_values", "labels"),
        encoder_tokens_per_image=lambda cfg: encoder_tokens_per_image(cfg, kind),
        encoder_layers=encoder_layers,
        dense_encoder_mask=False,
        vision_params=lambda cfg: vision_params(cfg, kind),
    )
