"""Model FLOPs of one sample, for TFLOP/s and MFU.

Counts the matmul FLOPs of the model as defined (2 per multiply-add), forward x3 for trained
parts (forward + backward), x1 for a frozen vision encoder, and no recomputation: the usual
"model FLOPs" of MFU. Attention is counted over the positions actually attended (causal text:
half; cross-attention: every visual token; vision encoder: all tiles of an image, padded to 8).
"""

import torch

from .config import RunConfig

# Dense bf16 peak of one accelerator, by a substring of torch.cuda.get_device_name().
PEAK_BF16_FLOPS = {"H200": 989.4e12, "H100": 989.4e12, "A100": 312e12, "B200": 2250e12, "GH200": 989.4e12}


def visual_tokens_per_image(cfg: RunConfig) -> int:
    v = cfg.model.vision
    return v.max_num_tiles * ((v.image_size // v.patch_size) ** 2 + 1)


def flops_per_sample(cfg: RunConfig, padded_vocab_size: int) -> float:
    """Training FLOPs of one sample (``seq_length`` text tokens, ``max_images`` images)."""
    t, v, d = cfg.model.text, cfg.model.vision, cfg.data
    s, h, f = d.seq_length, t.hidden_size, t.ffn_hidden_size
    kv = (t.num_query_groups or t.num_attention_heads) * (h // t.num_attention_heads)
    visual = d.max_images * visual_tokens_per_image(cfg)
    n_cross = len(t.cross_attention_layers)
    n_self = t.num_layers - n_cross
    mlp = 2 * 3 * h * f
    self_layer = s * (2 * h * (h + 2 * kv) + 2 * h * h + mlp) + 2 * s * s * h  # causal: half of 4*s*s*h
    cross_layer = s * (2 * h * h + 2 * h * h + mlp) + 4 * s * visual * h + visual * 2 * h * 2 * kv
    vocab = s * 2 * h * padded_vocab_size
    text = n_self * self_layer + n_cross * cross_layer + vocab
    tile = (v.image_size // v.patch_size) ** 2 + 1
    padded = v.max_num_tiles * (tile + (8 - tile % 8) % 8)
    hv, fv = v.hidden_size, v.intermediate_size
    vision_layer = padded * (2 * 4 * hv * hv + 2 * 2 * hv * fv) + 4 * padded * padded * hv
    vision = d.max_images * (v.num_hidden_layers + v.num_global_layers) * vision_layer
    out_dim = hv * (1 + len(v.intermediate_layers_indices))
    projector = visual * 2 * out_dim * h
    vision_factor = 1 if cfg.model.freeze_vision_encoder else 3
    return 3 * (text + projector) + vision_factor * vision


def peak_flops(device: torch.device) -> float | None:
    """The device's dense bf16 peak, or None (CPU, unknown GPU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_FLOPS.items() if key in name), None)
