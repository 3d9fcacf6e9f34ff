"""Model FLOPs of one sample, for TFLOP/s and MFU.

Counts the matmul and convolution FLOPs of the model as defined (2 per multiply-add), forward x3
for trained parts (forward + backward), x1 for a frozen vision encoder, and no recomputation: the
usual "model FLOPs" of MFU. Attention is counted over the positions actually attended (causal
text: half; cross-attention: every visual token; mllama's vision encoder: all tiles of an image,
padded to 8). ``tests/training/test_flops.py`` checks the forward and backward counts against
``torch.utils.flop_counter`` on the tiny configs of every architecture.
"""

import torch

from .config import RunConfig
from .families import family
from .families.spec import kv_width, mlp_matrices, patches

# Dense bf16 peak of one accelerator, by a substring of torch.cuda.get_device_name().
PEAK_BF16_FLOPS = {"H200": 989.4e12, "H100": 989.4e12, "A100": 312e12, "B200": 2250e12, "GH200": 989.4e12}


def visual_tokens_per_image(cfg: RunConfig) -> int:
    """Rows of ``X`` one image contributes (the model family's count)."""
    return family(cfg).visual_tokens_per_image(cfg)


def _vision_flops(cfg: RunConfig) -> float:
    """Forward FLOPs per sample of the vision encoder: its layers over each image's tokens and the RGB
    patch convolution of each tile."""
    f, v = family(cfg), cfg.model.vision
    hv, fv = v.hidden_size, v.intermediate_size
    tokens = f.encoder_tokens_per_image(cfg)
    vision_layer = tokens * (2 * 4 * hv * hv + 2 * 2 * hv * fv) + 4 * tokens * tokens * hv
    patch_embedding = v.max_num_tiles * patches(v) * 2 * 3 * v.patch_size**2 * hv
    return cfg.data.max_images * (f.encoder_layers(cfg) * vision_layer + patch_embedding)


def forward_flops_per_sample(cfg: RunConfig, padded_vocab_size: int) -> dict[str, float]:
    """Forward FLOPs of one sample (``seq_length`` text tokens, ``max_images`` images) by part:
    ``text`` (decoder and LM head), ``connector`` (projector or resampler), ``vision`` (encoder)."""
    t, d, spec = cfg.model.text, cfg.data, family(cfg)
    s, h, f = d.seq_length, t.hidden_size, t.ffn_hidden_size
    visual = d.max_images * visual_tokens_per_image(cfg)
    n_cross = len(t.cross_attention_layers)
    n_self = t.num_layers - n_cross
    mlp = 2 * mlp_matrices(t) * h * f
    self_layer = s * (2 * h * (h + 2 * kv_width(t)) + 2 * h * h + mlp) + 2 * s * s * h  # causal: half of 4*s*s*h
    vocab = s * 2 * h * padded_vocab_size
    text = n_self * self_layer + n_cross * spec.cross_layer_flops(cfg, self_layer, visual) + vocab
    return {"text": text, "connector": spec.connector_flops(cfg), "vision": _vision_flops(cfg)}


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
