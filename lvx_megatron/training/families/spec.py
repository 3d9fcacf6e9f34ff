"""What a model family tells the training code (the ``ModelFamily`` spec) and the sizes every family shares."""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ...models.vlm import StageParts, VisionLanguageModel
from ..config import FieldError, ModelConfig, RunConfig, TextModelConfig, VisionModelConfig


@dataclass(frozen=True)
class ModelFamily:
    """One model family, registered once in :data:`lvx_megatron.training.families.FAMILIES`.

    Config (``model`` section):
        name: the value of ``model.architecture``.
        defaults: the raw ``model`` mapping -> the same with this family's defaults filled in
            (before validation: ``vision.max_num_tiles``, ``vision.norm_eps``, its own sections).
        check: raises ``FieldError`` for what the field types cannot say (a required field, a field
            this family does not use).
    Model:
        build: ``(cfg, StageParts)`` -> this pipeline stage's model (weights not yet initialised by name).
        visual_width: width of ``X`` (the decoder config's ``visual_hidden_size``).
        visual_tokens_per_image: rows of ``X`` one image contributes (the model's own count).
        model_inputs: the batch keys the model's ``forward`` takes, as keyword arguments.
        tp_divides: model fields beyond the text decoder's that the tensor-parallel size must divide
            (dotted name -> value).
    FLOPs (forward, one sample; ``training/flops.py``) and memory (``training/memory.py``):
        encoder_tokens_per_image, encoder_layers: what one image runs through the vision encoder.
        dense_encoder_mask: the encoder holds a dense ``tokens x tokens`` padding mask per image.
        cross_layer_flops: ``(cfg, self_layer, visual)`` -> one layer at ``cross_attention_layers``,
            given a plain decoder layer's FLOPs and the sample's visual tokens.
        connector_flops: vision features -> ``X`` (projector or resampler).
        cross_layer_params: ``(cfg, self_layer)`` -> one layer at ``cross_attention_layers``, given a
            plain decoder layer's parameters.
        vision_params, connector_params: exact parameter counts of the encoder and the connector.
    """

    name: str
    defaults: Callable[[dict[str, Any]], dict[str, Any]]
    check: Callable[[ModelConfig], None]
    build: Callable[[RunConfig, StageParts], VisionLanguageModel]
    visual_width: Callable[[RunConfig], int]
    visual_tokens_per_image: Callable[[RunConfig], int]
    model_inputs: tuple[str, ...]
    tp_divides: Callable[[RunConfig], dict[str, int]]
    encoder_tokens_per_image: Callable[[RunConfig], int]
    encoder_layers: Callable[[RunConfig], int]
    dense_encoder_mask: bool
    cross_layer_flops: Callable[[RunConfig, float, int], float]
    connector_flops: Callable[[RunConfig], float]
    cross_layer_params: Callable[[RunConfig, int], int]
    vision_params: Callable[[RunConfig], int]
    connector_params: Callable[[RunConfig], int]


def _text_width(cfg: RunConfig) -> int:
    return cfg.model.text.hidden_size


# What the families whose projector maps the visual features to the text width share: X is as wide
# as the text, and no setting of their own needs dividing by TP.
PROJECTED_TO_TEXT_WIDTH: dict[str, Any] = {"visual_width": _text_width, "tp_divides": lambda cfg: {}}


def patches(v: VisionModelConfig) -> int:
    """Patches of one tile (a ViT drops the pixels past the last whole patch)."""
    return (v.image_size // v.patch_size) ** 2


def kv_width(t: TextModelConfig) -> int:
    """Width of the decoder's K (or V) projection: query groups x head dim."""
    return (t.num_query_groups or t.num_attention_heads) * (t.hidden_size // t.num_attention_heads)


def mlp_matrices(t: TextModelConfig) -> int:
    """Weight matrices of the decoder MLP: SwiGLU 3, GELU 2."""
    return 3 if t.mlp == "swiglu" else 2


def with_vision_defaults(data: dict[str, Any], **defaults: Any) -> dict[str, Any]:
    """``data`` with ``defaults`` under its ``vision`` mapping (the given values win)."""
    if isinstance(data.get("vision"), dict):
        data = {**data, "vision": {**defaults, **data["vision"]}}
    return data


def reject_unused(architecture: str, given: dict[str, Any]) -> None:
    """``FieldError`` for the first field of ``given`` (dotted name -> value, falsy: left out) that is set."""
    for field, value in given.items():
        if value:
            raise FieldError(field, f"not used by architecture {architecture!r}; leave it out")
