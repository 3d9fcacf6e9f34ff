"""OpenFlamingo (``model.architecture: openflamingo``): CLIP tower, Perceiver Resampler, a gated
cross-attention block before every n-th decoder layer (``models/openflamingo.py``)."""

from typing import Any

from ...core import FlamingoBlockSizes
from ...models import openflamingo
from ...models.perceiver import PerceiverConfig
from ..config import ModelConfig, RunConfig
from . import vit
from .spec import ModelFamily, StageParts, patches, reject_unused, with_vision_defaults


def perceiver_config(cfg: RunConfig) -> PerceiverConfig:
    """The resampler's config (its width is the tower's)."""
    r = cfg.model.perceiver
    return PerceiverConfig(
        dim=cfg.model.vision.hidden_size,
        depth=r.depth,
        heads=r.heads,
        head_dim=r.head_dim,
        num_latents=r.num_latents,
        ff_mult=r.ff_mult,
        max_num_media=r.max_num_media,
        max_num_frames=r.max_num_frames,
    )


def _defaults(data: dict[str, Any]) -> dict[str, Any]:
    """One tile per image; the resampler and the gated blocks' sizes (8 x 64 heads, feed-forward 4 x d)."""
    data = {**with_vision_defaults(data, max_num_tiles=1, norm_eps=1e-5)}
    data.setdefault("perceiver", {})
    xattn = data.get("cross_attention") or {}
    if isinstance(xattn, dict):
        data["cross_attention"] = {"heads": 8, "head_dim": 64, "ff_mult": 4, **xattn}
    return data


def _check(m: ModelConfig) -> None:
    vit.check_vit(m, "openflamingo")
    reject_unused("openflamingo", vit.unused_by_towers(m))


def _build(cfg: RunConfig, parts: StageParts) -> openflamingo.OpenFlamingoModel:
    x = cfg.model.cross_attention
    return openflamingo.OpenFlamingoModel(
        parts, vit.vit_config(cfg, "clip"), perceiver_config(cfg), FlamingoBlockSizes(x.heads, x.head_dim, x.ff_mult)
    )


def _cross_layer_flops(cfg: RunConfig, self_layer: float, visual: int) -> float:
    """The gated block (its own heads, on the latents at the tower's width), then the decoder layer."""
    m, s, h = cfg.model, cfg.data.seq_length, cfg.model.text.hidden_size
    x, dv = m.cross_attention, m.vision.hidden_size
    inner = x.heads * x.head_dim
    block = s * (2 * h * inner + 2 * inner * h + 2 * 2 * h * x.ff_mult * h) + 4 * s * visual * inner
    return self_layer + block + visual * 2 * dv * 2 * inner


def _connector_flops(cfg: RunConfig) -> float:
    """The resampler: latents attend to ``[frame features; latents]``, then a feed-forward, per layer."""
    r, hv = cfg.model.perceiver, cfg.model.vision.hidden_size
    inner, lat, keys = r.heads * r.head_dim, r.num_latents, patches(cfg.model.vision) + r.num_latents
    layer = 2 * lat * hv * inner + 2 * keys * hv * 2 * inner + 4 * lat * keys * inner + 2 * lat * inner * hv
    layer += 2 * 2 * lat * hv * r.ff_mult * hv
    return cfg.data.max_images * r.depth * layer


def _cross_layer_params(cfg: RunConfig, self_layer: int) -> int:
    """The gated block before the decoder layer."""
    m, h = cfg.model, cfg.model.text.hidden_size
    x, dv = m.cross_attention, m.vision.hidden_size
    inner = x.heads * x.head_dim
    block = 2 * 2 * h + h * inner + dv * 2 * inner + inner * h + 2 * h * x.ff_mult * h + 2
    return self_layer + block


def _connector_params(cfg: RunConfig) -> int:
    r, hv = cfg.model.perceiver, cfg.model.vision.hidden_size
    inner = r.heads * r.head_dim
    layer = 4 * hv + hv * inner + hv * 2 * inner + inner * hv + 2 * hv + 2 * hv * r.ff_mult * hv
    embeddings = (r.num_latents + (r.max_num_media or 0) + (r.max_num_frames or 0)) * hv
    return embeddings + r.depth * layer + 2 * hv


OPENFLAMINGO = ModelFamily(
    name="openflamingo",
    defaults=_defaults,
    check=_check,
    build=_build,
    visual_width=lambda cfg: cfg.model.vision.hidden_size,  # the gated blocks read the latents at the tower's width
    visual_tokens_per_image=lambda cfg: openflamingo.visual_tokens_per_image(perceiver_config(cfg)),
    tp_divides=lambda cfg: {"model.cross_attention.heads": cfg.model.cross_attention.heads},
    cross_layer_flops=_cross_layer_flops,
    connector_flops=_connector_flops,
    cross_layer_params=_cross_layer_params,
    connector_params=_connector_params,
    **vit.tower_terms("clip"),
)
