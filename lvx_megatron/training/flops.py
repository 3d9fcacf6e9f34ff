"""Model FLOPs of one sample, for TFLOP/s and MFU.

Counts the matmul and convolution FLOPs of the model as defined (2 per multiply-add), forward x3
for trained parts (forward + backward), x1 for a frozen vision encoder, and no recomputation: the
usual "model FLOPs" of MFU. Attention is counted over the positions actually attended (causal
text: half; cross-attention: every visual token; mllama's vision encoder: all tiles of an image,
padded to 8). ``tests/test_flops.py`` checks the forward and backward counts against
``torch.utils.flop_counter`` on the tiny configs of every architecture.
"""

import torch

from .config import RunConfig

# Dense bf16 peak of one accelerator, by a substring of torch.cuda.get_device_name().
PEAK_BF16_FLOPS = {"H200": 989.4e12, "H100": 989.4e12, "A100": 312e12, "B200": 2250e12, "GH200": 989.4e12}


def visual_tokens_per_image(cfg: RunConfig) -> int:
    """Rows of ``X`` one image contributes (mllama: every tile's patches and class token;
    openflamingo: the resampler's latents; mplug_owl3: the SigLIP patches)."""
    m, v = cfg.model, cfg.model.vision
    patches = (v.image_size // v.patch_size) ** 2
    if m.architecture == "openflamingo":
        return m.perceiver.num_latents
    if m.architecture == "mplug_owl3":
        return patches
    return v.max_num_tiles * (patches + 1)


def _cross_layer_flops(cfg: RunConfig, self_layer: float, visual: int) -> float:
    """Forward FLOPs of one decoder layer at ``cross_attention_layers`` (``visual`` tokens of ``X``)."""
    m, t, s = cfg.model, cfg.model.text, cfg.data.seq_length
    h, f = t.hidden_size, t.ffn_hidden_size
    kv = (t.num_query_groups or t.num_attention_heads) * (h // t.num_attention_heads)
    if m.architecture == "mllama":
        mlp = 2 * (3 if t.mlp == "swiglu" else 2) * h * f
        return s * (2 * h * h + 2 * h * h + mlp) + 4 * s * visual * h + visual * 2 * h * 2 * kv
    if m.architecture == "openflamingo":  # the gated block, then the decoder layer
        x, dv = m.cross_attention, m.vision.hidden_size
        inner = x.heads * x.head_dim
        block = s * (2 * h * inner + 2 * inner * h + 2 * 2 * h * x.ff_mult * h) + 4 * s * visual * inner
        return self_layer + block + visual * 2 * dv * 2 * inner
    return self_layer + 4 * s * visual * h + visual * 2 * h * 2 * kv  # hyper: visual K/V and attention


def _vision_flops(cfg: RunConfig) -> tuple[float, float]:
    """Forward FLOPs per sample of the vision encoder and of the connector (projector or resampler)."""
    m, v, d, h = cfg.model, cfg.model.vision, cfg.data, cfg.model.text.hidden_size
    hv, fv = v.hidden_size, v.intermediate_size
    patches = (v.image_size // v.patch_size) ** 2
    if m.architecture == "mllama":
        tile = patches + 1
        tokens = v.max_num_tiles * (tile + (8 - tile % 8) % 8)
        layers = v.num_hidden_layers + v.num_global_layers
    else:
        tokens = patches + int(m.architecture == "openflamingo")
        layers = v.num_hidden_layers + 1 + v.feature_layer
    vision_layer = tokens * (2 * 4 * hv * hv + 2 * 2 * hv * fv) + 4 * tokens * tokens * hv
    tiles = v.max_num_tiles if m.architecture == "mllama" else 1
    patch_embedding = tiles * patches * 2 * 3 * v.patch_size**2 * hv  # the RGB patch convolution
    vision = d.max_images * (layers * vision_layer + patch_embedding)
    visual = d.max_images * visual_tokens_per_image(cfg)
    if m.architecture == "mllama":
        return vision, visual * 2 * hv * (1 + len(v.intermediate_layers_indices)) * h
    if m.architecture == "mplug_owl3":
        return vision, visual * 2 * hv * h
    r = m.perceiver
    inner, lat, keys = r.heads * r.head_dim, r.num_latents, patches + r.num_latents
    layer = 2 * lat * hv * inner + 2 * keys * hv * 2 * inner + 4 * lat * keys * inner + 2 * lat * inner * hv
    layer += 2 * 2 * lat * hv * r.ff_mult * hv
    return vision, d.max_images * r.depth * layer


def forward_flops_per_sample(cfg: RunConfig, padded_vocab_size: int) -> dict[str, float]:
    """Forward FLOPs of one sample (``seq_length`` text tokens, ``max_images`` images) by part:
    ``text`` (decoder and LM head), ``connector`` (projector or resampler), ``vision`` (encoder)."""
    t, d = cfg.model.text, cfg.data
    s, h, f = d.seq_length, t.hidden_size, t.ffn_hidden_size
    kv = (t.num_query_groups or t.num_attention_heads) * (h // t.num_attention_heads)
    visual = d.max_images * visual_tokens_per_image(cfg)
    n_cross = len(t.cross_attention_layers)
    n_self = t.num_layers - n_cross
    mlp = 2 * (3 if t.mlp == "swiglu" else 2) * h * f
    self_layer = s * (2 * h * (h + 2 * kv) + 2 * h * h + mlp) + 2 * s * s * h  # causal: half of 4*s*s*h
    vocab = s * 2 * h * padded_vocab_size
    text = n_self * self_layer + n_cross * _cross_layer_flops(cfg, self_layer, visual) + vocab
    vision, connector = _vision_flops(cfg)
    return {"text": text, "connector": connector, "vision": vision}


def flops_per_sample(cfg: RunConfig, padded_vocab_size: int) -> float:
    """Training FLOPs of one sample: forward x3, a frozen vision encoder's x1."""
    parts = forward_flops_per_sample(cfg, padded_vocab_size)
    vision_factor = 1 if cfg.model.freeze_vision_encoder else 3
    return 3 * (parts["text"] + parts["connector"]) + vision_factor * parts["vision"]


def peak_flops(device: torch.device) -> float | None:
    """The device's dense bf16 peak, or None (CPU, unknown GPU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_FLOPS.items() if key in name), None)
