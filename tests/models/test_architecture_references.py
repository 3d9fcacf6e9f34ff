"""The OpenFlamingo- and mPLUG-Owl3-style components against references, in float64.

* CLIP and SigLIP towers: transformers' ``CLIPVisionModel`` / ``SiglipVisionModel`` with the same
  weights (the installable references).
* Perceiver Resampler, Flamingo gated blocks and mPLUG-Owl3 hyper attention: no installable
  reference exists (open_flamingo and mPLUG-Owl3's remote code are not reliably pip-installable),
  so they are checked against straightforward re-implementations written here from the papers'
  equations (Flamingo, arXiv 2204.14198, sec. 2 and appendix; mPLUG-Owl3, arXiv 2408.04840,
  sec. 2.2), plain einsums over whole tensors. The whole tiny models (vision tower, resampler or
  projector, decoder with its cross-attention layers, masks, MI-Rope, LM head) are compared
  logit by logit.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from train_harness import TINY

from lvx_megatron.launch import spawn_gloo
from lvx_megatron.models.perceiver import PerceiverConfig, PerceiverResampler
from lvx_megatron.models.vit import ViTConfig, ViTVisionTower

transformers = pytest.importorskip("transformers")
CONFIGS = TINY.parent
ATOL = 1e-10


def _randomize(module: torch.nn.Module, seed: int) -> None:
    """Every parameter random (norm weights around 1, gates non-zero), so no term hides behind a 0 or 1."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=p.dtype)
            p.copy_(1 + 0.1 * noise if "norm" in name and name.endswith("weight") else 0.2 * noise)


# --- vision towers vs transformers ----------------------------------------------------------------


@pytest.mark.parametrize(
    "kind, image_size, feature_layer",
    [("clip", 32, -1), ("clip", 32, -2), ("siglip", 30, -2), ("siglip", 32, -1)],  # 30: SigLIP drops pixels
)
def test_vision_tower_matches_transformers(kind, image_size, feature_layer):
    sizes = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, patch_size=8)  # HF's names and ours
    hf_args = dict(sizes, num_attention_heads=4)
    if kind == "clip":
        hf = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(image_size=image_size, **hf_args))
    else:
        hf = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(image_size=image_size, **hf_args))
    hf = hf.double().eval()
    _randomize(hf, 0)
    norm_eps = hf.config.layer_norm_eps
    config = ViTConfig(
        kind=kind, **sizes, attention_heads=4, image_size=image_size, norm_eps=norm_eps, feature_layer=feature_layer
    )
    ours = ViTVisionTower(config).double()
    hf_weights = {k.removeprefix("vision_model."): v for k, v in hf.state_dict().items()}
    ours.load_state_dict({k: hf_weights[k] for k in ours.state_dict()})
    pixels = torch.randn(3, 3, image_size, image_size, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    reference = hf(pixel_values=pixels, output_hidden_states=True).hidden_states[feature_layer]
    reference = reference[:, 1:] if kind == "clip" else reference  # OpenFlamingo drops CLIP's class token
    torch.testing.assert_close(ours(pixels), reference, rtol=0, atol=ATOL)
    assert ours(pixels[:0]).shape == (0, config.num_patches, 32)  # a CP rank without images


# --- the papers' equations --------------------------------------------------------------------------


def _layer_norm(x, w, b, eps=1e-5):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * w + b


def _rms_norm(x, w, eps):
    return x / torch.sqrt((x**2).mean(-1, keepdim=True) + eps) * w


def _attention(q, k, v, allowed=None):
    """``softmax(q k^T / sqrt(d)) v`` per head (``q [b, i, h, d]``, ``k/v [b, j, h, d]``); rows that may
    see nothing give 0."""
    scores = torch.einsum("bihd,bjhd->bhij", q, k) / math.sqrt(q.shape[-1])
    if allowed is None:
        return torch.einsum("bhij,bjhd->bihd", scores.softmax(-1), v)
    scores = scores.masked_fill(~allowed[:, None], -math.inf)
    weights = torch.nan_to_num(scores.softmax(-1))  # all -inf rows: 0
    return torch.einsum("bhij,bjhd->bihd", weights, v)


def _heads(x, heads):
    return x.view(*x.shape[:-1], heads, -1)


def perceiver_reference(p: dict, x, media_index, cfg: PerceiverConfig):
    """Flamingo's Perceiver Resampler (appendix A.1.1): latents attend to [features; latents]."""
    if "media_time_embs" in p:
        x = x + p["media_time_embs"][media_index]
    z = p["latents"].expand(x.shape[0], -1, -1)
    for i in range(cfg.depth):
        a = f"layers.{i}.attn."
        xn = _layer_norm(x, p[a + "media_norm.weight"], p[a + "media_norm.bias"])
        zn = _layer_norm(z, p[a + "latents_norm.weight"], p[a + "latents_norm.bias"])
        q = _heads(zn @ p[a + "to_q.weight"].T, cfg.heads)
        kv = torch.cat([xn, zn], dim=1) @ p[a + "to_kv.weight"].T
        k, v = (_heads(t, cfg.heads) for t in kv.chunk(2, dim=-1))
        z = z + _attention(q, k, v).flatten(2) @ p[a + "to_out.weight"].T
        f = f"layers.{i}.ff."
        h = _layer_norm(z, p[f + "norm.weight"], p[f + "norm.bias"]) @ p[f + "fc1.weight"].T
        z = z + F.gelu(h) @ p[f + "fc2.weight"].T
    return _layer_norm(z, p["norm.weight"], p["norm.bias"])


def test_perceiver_resampler_matches_the_papers_equations():
    cfg = PerceiverConfig(dim=24, depth=2, heads=3, head_dim=8, num_latents=5, ff_mult=2, max_num_media=4)
    resampler = PerceiverResampler(cfg).double()
    _randomize(resampler, 2)
    x = torch.randn(3, 1, 7, 24, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    media = torch.tensor([2, 0, 3])
    p = dict(resampler.named_parameters())
    torch.testing.assert_close(resampler(x, media), perceiver_reference(p, x[:, 0], media, cfg), rtol=0, atol=ATOL)


# --- whole tiny models ------------------------------------------------------------------------------


def _rope(x, positions, base):
    """RoPE (rotate-half layout) of ``x [b, s, h, d]`` at integer ``positions [b, s]``.

    The angles and their cos/sin in float32, as megatron builds its RoPE table (the rest float64).
    """
    d = x.shape[-1]
    inv_freq = 1.0 / (base ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    angles = positions[..., None].float() * inv_freq
    cos, sin = angles.cos().double()[:, :, None], angles.sin().double()[:, :, None]
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def _gqa(k, heads):
    return k.repeat_interleave(heads // k.shape[2], dim=2)


def _qkv(p, pre, h, cfg):
    """megatron's fused q/k/v: per key-value group, its query heads then one key and one value head."""
    t = cfg.model.text
    groups = t.num_query_groups or t.num_attention_heads
    d = t.hidden_size // t.num_attention_heads
    out = h @ p[pre + "linear_qkv.weight"].T + p.get(pre + "linear_qkv.bias", 0)
    out = out.view(*h.shape[:2], groups, -1)
    q, k, v = out.split([t.num_attention_heads // groups * d, d, d], dim=-1)
    return q.reshape(*h.shape[:2], t.num_attention_heads, d), k, v


def _mlp(p, pre, h, cfg):
    up = h @ p[pre + "linear_fc1.weight"].T
    if cfg.model.text.mlp == "swiglu":
        gate, up = up.chunk(2, dim=-1)
        return (F.silu(gate) * up) @ p[pre + "linear_fc2.weight"].T
    return F.gelu(up) @ p[pre + "linear_fc2.weight"].T


def _self_attention_layer(p, pre, h, cfg, hyper=None):
    """A Llama/Qwen2 decoder layer; ``hyper``: mPLUG-Owl3's visual branch ``(X, image positions, sees)``."""
    t = cfg.model.text
    eps, heads = t.norm_epsilon, t.num_attention_heads
    positions = torch.arange(h.shape[1]).expand(h.shape[0], -1)
    x = _rms_norm(h, p[pre + "input_layernorm.weight"], eps)
    q, k, v = _qkv(p, pre + "self_attention.", x, cfg)
    q, k = _rope(q, positions, t.rotary_base), _rope(k, positions, t.rotary_base)
    causal = torch.ones(h.shape[1], h.shape[1], dtype=torch.bool).tril().expand(h.shape[0], -1, -1)
    out = _attention(q, _gqa(k, heads), _gqa(v, heads), causal).flatten(2)
    if hyper is not None:  # mPLUG-Owl3 eq.: shared norm, own K/V, MI-Rope, gate sigmoid(g) on the heads' outputs
        visual, image_pos, sees = hyper
        xv = _rms_norm(visual, p[pre + "input_layernorm.weight"], eps)
        a = pre + "self_attention.core_attention."
        kv = xv @ p[a + "visual_attention.linear_kv.weight"].T + p[a + "visual_attention.linear_kv.bias"]
        kx, vx = kv.view(*kv.shape[:2], t.num_query_groups, -1).chunk(2, dim=-1)  # per group: K then V
        kx = _rope(kx, image_pos, t.rotary_base)
        cross = _attention(q, _gqa(kx, heads), _gqa(vx, heads), sees).flatten(2)
        g = torch.sigmoid(p[a + "hyper_gate"])
        out = torch.where(sees.any(-1, keepdim=True), (1 - g) * out + g * cross, out)
    h = h + out @ p[pre + "self_attention.linear_proj.weight"].T
    return h + _mlp(p, pre + "mlp.", _rms_norm(h, p[pre + "pre_mlp_layernorm.weight"], eps), cfg)


def _gated_block(p, pre, h, latents, sees, cfg):
    """Flamingo's GATED XATTN-DENSE (fig. 4): tanh-gated masked cross-attention, then tanh-gated FFW."""
    x_cfg = cfg.model.cross_attention
    y = _layer_norm(h, p[pre + "input_layernorm.weight"], p[pre + "input_layernorm.bias"])
    q = _heads(y @ p[pre + "cross_attention.linear_q.weight"].T, x_cfg.heads)
    kv = (latents @ p[pre + "cross_attention.linear_kv.weight"].T).view(*latents.shape[:2], x_cfg.heads, -1)
    k, v = kv.chunk(2, dim=-1)
    attn = _attention(q, k, v, sees).flatten(2) @ p[pre + "cross_attention.linear_proj.weight"].T
    h = h + torch.tanh(p[pre + "cross_attn_attn_gate"]) * attn
    y = _layer_norm(h, p[pre + "pre_mlp_layernorm.weight"], p[pre + "pre_mlp_layernorm.bias"])
    ff = F.gelu(y @ p[pre + "mlp.linear_fc1.weight"].T) @ p[pre + "mlp.linear_fc2.weight"].T
    return h + torch.tanh(p[pre + "cross_attn_mlp_gate"]) * ff


def model_reference(cfg, p: dict, tokens, pixel_values, image_positions):
    """Logits ``[B, S, V]`` of the whole model from the papers' equations (HF towers for the vision)."""
    arch, t, v = cfg.model.architecture, cfg.model.text, cfg.model.vision
    b, n = pixel_values.shape[:2]
    hf_args = dict(
        hidden_size=v.hidden_size,
        intermediate_size=v.intermediate_size,
        num_hidden_layers=v.num_hidden_layers,
        num_attention_heads=v.attention_heads,
        image_size=v.image_size,
        patch_size=v.patch_size,
        layer_norm_eps=v.norm_eps,
    )
    hf_class = transformers.CLIPVisionModel if arch == "openflamingo" else transformers.SiglipVisionModel
    tower = hf_class(getattr(transformers, hf_class.__name__.replace("Model", "Config"))(**hf_args)).double()
    weights = {k.removeprefix("vision_model."): w for k, w in p.items() if k.startswith("vision_model.")}
    loaded = tower.load_state_dict(weights, strict=False)
    assert not loaded.unexpected_keys and all(
        "post_layernorm" in k or "head" in k or "layers.2" in k for k in loaded.missing_keys
    )
    features = tower(pixel_values.flatten(0, 2), output_hidden_states=True).hidden_states[v.feature_layer]
    positions = torch.arange(tokens.shape[1])
    seen = (image_positions[:, None] >= 0) & (image_positions[:, None] <= positions[None, :, None])  # [b, s, n]
    if arch == "openflamingo":
        r = cfg.model.perceiver
        pc = PerceiverConfig(
            dim=v.hidden_size, **{k: getattr(r, k) for k in ("depth", "heads", "head_dim", "num_latents", "ff_mult")}
        )
        media = torch.arange(n).repeat(b)
        latents = perceiver_reference(
            {k[len("perceiver.") :]: w for k, w in p.items() if k.startswith("perceiver.")}, features[:, 1:], media, pc
        )
        visual = latents.view(b, -1, v.hidden_size)  # [b, n * latents, dv]
        latest = seen & (torch.arange(n) == seen.sum(-1, keepdim=True) - 1)  # only the most recent image
        sees = latest.repeat_interleave(r.num_latents, dim=-1)
    else:
        visual = (features @ p["vision2text_model.weight"].T + p["vision2text_model.bias"]).view(b, -1, t.hidden_size)
        sees = seen.repeat_interleave(features.shape[1], dim=-1)
        image_pos = image_positions.clamp(min=0).repeat_interleave(features.shape[1], dim=1)
    h = p["embedding.word_embeddings.weight"][tokens]
    for i in range(t.num_layers):
        pre = f"decoder.layers.{i}."
        if i in t.cross_attention_layers and arch == "openflamingo":
            h = _gated_block(p, pre + "gated_cross_attention.", h, visual, sees, cfg)
            h = _self_attention_layer(p, pre + "decoder_layer.", h, cfg)
        elif i in t.cross_attention_layers:
            h = _self_attention_layer(p, pre, h, cfg, hyper=(visual, image_pos, sees))
        else:
            h = _self_attention_layer(p, pre, h, cfg)
    h = _rms_norm(h, p["decoder.final_layernorm.weight"], t.norm_epsilon)
    return h @ p["output_layer.weight"].T


def models_and_references(rank: int, world_size: int) -> dict:
    """Worker: each tiny model in float64 with random weights, and its reference logits."""
    from megatron.core import parallel_state as ps

    from lvx_megatron.core.cpu_compat import enable_cpu_compat
    from lvx_megatron.training.config import load_config
    from lvx_megatron.training.setup import build_model, init_model_parallel

    enable_cpu_compat()
    gen = torch.Generator().manual_seed(5)
    tokens = torch.randint(4, 29, (2, 12), generator=gen)
    pixel_values = torch.randn(2, 3, 1, 3, 32, 32, generator=gen, dtype=torch.float64)
    image_positions = torch.tensor([[2, 5, 6], [4, -1, -1]])  # rows 0-1 (0-3) see no image; padding images
    errors = {}
    for name in ("tiny-openflamingo", "tiny-mplug-owl3"):
        cfg = load_config(CONFIGS / f"{name}.yaml", {"parallel.context_parallel_size": 1})
        pg = init_model_parallel(cfg)
        _, model = build_model(cfg, vocab_size=29, pg=pg, device=torch.device("cpu"))
        model = model.double()
        _randomize(model, 4)
        with torch.no_grad():
            logits = model(tokens=tokens, image_positions=image_positions, pixel_values=pixel_values)
            params = {k: w.detach() for k, w in model.named_parameters()}
            reference = model_reference(cfg, params, tokens, pixel_values, image_positions)
        errors[name] = float((logits - reference).abs().max()), float(reference.abs().max())
        ps.destroy_model_parallel()
    return errors


def test_tiny_models_match_the_papers_equations():
    for name, (error, scale) in spawn_gloo(1, models_and_references)[0].items():
        assert scale > 0.1 and error <= 1e-9 * scale, (name, error, scale)
