"""mPLUG-Owl3 (``model.architecture: mplug_owl3``): SigLIP tower, linear projector, hyper-attention
decoder layers (``models/mplug_owl3.py``)."""

from typing import Any

from ...models import mplug_owl3
from ..config import ModelConfig, RunConfig
from . import vit
from .spec import PROJECTED_TO_TEXT_WIDTH, ModelFamily, StageParts, kv_width, reject_unused, with_vision_defaults


def _defaults(data: dict[str, Any]) -> dict[str, Any]:
    return with_vision_defaults(data, max_num_tiles=1, norm_eps=1e-6)  # SigLIP's LayerNorm eps


def _check(m: ModelConfig) -> None:
    x = m.cross_attention
    vit.check_vit(m, "mplug_owl3")
    unused = vit.unused_by_towers(m)
    unused.update({f"cross_attention.{k}": getattr(x, k) for k in ("heads", "head_dim", "ff_mult")})
    unused["perceiver"] = m.perceiver
    reject_unused("mplug_owl3", unused)


def _build(cfg: RunConfig, parts: StageParts) -> mplug_owl3.MplugOwl3Model:
    return mplug_owl3.MplugOwl3Model(parts, vit.vit_config(cfg, "siglip"))


def _cross_layer_flops(cfg: RunConfig, self_layer: float, visual: int) -> float:
    """The decoder layer plus its hyper attention: visual K/V and attention over them."""
    t, s = cfg.model.text, cfg.data.seq_length
    h = t.hidden_size
    return self_layer + 4 * s * visual * h + visual * 2 * h * 2 * kv_width(t)


def _connector_flops(cfg: RunConfig) -> float:
    visual = cfg.data.max_images * _visual_tokens_per_image(cfg)
    return visual * 2 * cfg.model.vision.hidden_size * cfg.model.text.hidden_size


def _cross_layer_params(cfg: RunConfig, self_layer: int) -> int:
    """The decoder layer plus the visual K/V with bias and the per-channel gate."""
    t = cfg.model.text
    kv = kv_width(t)
    return self_layer + t.hidden_size * 2 * kv + 2 * kv + t.hidden_size


def _visual_tokens_per_image(cfg: RunConfig) -> int:
    return mplug_owl3.visual_tokens_per_image(vit.vit_config(cfg, "siglip"))


MPLUG_OWL3 = ModelFamily(
    name="mplug_owl3",
    defaults=_defaults,
    check=_check,
    build=_build,
    visual_tokens_per_image=_visual_tokens_per_image,
    cross_layer_flops=_cross_layer_flops,
    connector_flops=_connector_flops,
    cross_layer_params=_cross_layer_params,
    connector_params=lambda cfg: cfg.model.vision.hidden_size * cfg.model.text.hidden_size + cfg.model.text.hidden_size,
    **vit.tower_terms("siglip"),
    **PROJECTED_TO_TEXT_WIDTH,
)
