"""The CLIP and SigLIP vision towers of OpenFlamingo and mPLUG-Owl3 as plain torch modules.

One pre-LN ViT with the two families' differences as settings: CLIP (OpenFlamingo's ViT-L/14)
has a class token, a bias-free patch convolution, a LayerNorm before the layers and QuickGELU;
SigLIP (mPLUG-Owl3's so400m-patch14-384) has none of the first three and tanh-GELU. Parameter
names and shapes are those of transformers' ``CLIPVisionModel.vision_model`` /
``SiglipVisionModel.vision_model``, so loading those weights is a prefix change; the parts these
models never use (CLIP's ``post_layernorm``, SigLIP's ``post_layernorm`` and ``head``, the layers
after ``feature_layer``) are not built.

The features of an image are HF's ``hidden_states[feature_layer]`` at the patch positions:
OpenFlamingo takes open_clip's output tokens (the last layer, class token dropped, no final norm:
256 x 1024 per 224-px frame for ViT-L/14), mPLUG-Owl3 the penultimate layer (``hidden_states[-2]``,
729 x 1152 per 384-px frame).
"""

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

KINDS = ("clip", "siglip")


@dataclass(kw_only=True)
class ViTConfig:
    """Geometry of a CLIP or SigLIP vision tower (HF ``CLIPVisionConfig``/``SiglipVisionConfig`` names).

    ``num_hidden_layers`` is the checkpoint's layer count; ``feature_layer`` picks the hidden
    state used as features (-1: the last layer's output, -2: the one before, ...), and only the
    layers up to it are built.
    """

    kind: Literal["clip", "siglip"]
    hidden_size: int
    num_hidden_layers: int
    attention_heads: int
    intermediate_size: int
    image_size: int
    patch_size: int
    num_channels: int = 3
    norm_eps: float = 1e-5
    feature_layer: int = -1

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        for name in ("hidden_size", "num_hidden_layers", "attention_heads", "intermediate_size", "image_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if self.hidden_size % self.attention_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by attention_heads ({self.attention_heads})"
            )
        if not 1 <= self.patch_size <= self.image_size:
            # Not necessarily a divisor: SigLIP so400m-patch14-384 drops the last 6 pixels (27 x 27 patches).
            raise ValueError(f"patch_size must be in [1, image_size={self.image_size}], got {self.patch_size}")
        if not -self.num_hidden_layers <= self.feature_layer <= -1:
            raise ValueError(
                f"feature_layer must be in [-num_hidden_layers, -1] = [{-self.num_hidden_layers}, -1], "
                f"got {self.feature_layer}"
            )

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def layers_built(self) -> int:
        """Layers run to reach ``hidden_states[feature_layer]``."""
        return self.num_hidden_layers + 1 + self.feature_layer

    @property
    def class_token(self) -> bool:
        return self.kind == "clip"


class ViTAttention(nn.Module):
    """Multi-head self-attention with biases (HF ``q_proj``/``k_proj``/``v_proj``/``out_proj``)."""

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        hidden = config.hidden_size
        self.num_heads = config.attention_heads
        self.q_proj = nn.Linear(hidden, hidden)
        self.k_proj = nn.Linear(hidden, hidden)
        self.v_proj = nn.Linear(hidden, hidden)
        self.out_proj = nn.Linear(hidden, hidden)

    def forward(self, x: Tensor) -> Tensor:
        n, s, hidden = x.shape
        shape = (n, s, self.num_heads, hidden // self.num_heads)
        q, k, v = (p(x).view(shape).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        return self.out_proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(n, s, hidden))


class ViTMLP(nn.Module):
    """``fc2(act(fc1(x)))``: QuickGELU (CLIP) or tanh-approximated GELU (SigLIP)."""

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.kind = config.kind
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        h = self.fc1(x)
        h = h * torch.sigmoid(1.702 * h) if self.kind == "clip" else F.gelu(h, approximate="tanh")
        return self.fc2(h)


class ViTLayer(nn.Module):
    """Pre-LN transformer layer (HF ``layer_norm1``, ``self_attn``, ``layer_norm2``, ``mlp``)."""

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.norm_eps)
        self.self_attn = ViTAttention(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.norm_eps)
        self.mlp = ViTMLP(config)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class ViTEncoder(nn.Module):
    """The layers under HF's ``encoder.layers`` name."""

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(ViTLayer(config) for _ in range(config.layers_built))


class ViTEmbeddings(nn.Module):
    """Patch convolution, class token (CLIP) and learned position embeddings."""

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        hidden = config.hidden_size
        self.patch_embedding = nn.Conv2d(
            config.num_channels,
            hidden,
            kernel_size=config.patch_size,
            stride=config.patch_size,
            bias=not config.class_token,
        )
        if config.class_token:
            self.class_embedding = nn.Parameter(torch.zeros(hidden))
        self.position_embedding = nn.Embedding(config.num_patches + int(config.class_token), hidden)

    def forward(self, pixel_values: Tensor) -> Tensor:
        x = self.patch_embedding(pixel_values).flatten(2).transpose(1, 2)  # [n, patches, hidden]
        if hasattr(self, "class_embedding"):
            x = torch.cat([self.class_embedding.expand(x.shape[0], 1, -1), x], dim=1)
        return x + self.position_embedding.weight


class ViTVisionTower(nn.Module):
    """Images ``[N, C, H, W]`` -> patch features ``[N, num_patches, hidden_size]``.

    Runs in the parameters' dtype (pixel values are cast to it).

    Args:
        config: the tower's geometry.
        activation_checkpointing: recompute each layer in backward (``torch.utils.checkpoint``).
    """

    def __init__(self, config: ViTConfig, activation_checkpointing: bool = False) -> None:
        super().__init__()
        self.config = config
        self.activation_checkpointing = activation_checkpointing
        self.embeddings = ViTEmbeddings(config)
        if config.class_token:  # HF's spelling
            self.pre_layrnorm = nn.LayerNorm(config.hidden_size, eps=config.norm_eps)
        self.encoder = ViTEncoder(config)

    def forward(self, pixel_values: Tensor) -> Tensor:
        cfg = self.config
        expected = (cfg.num_channels, cfg.image_size, cfg.image_size)
        if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != expected:
            raise ValueError(f"pixel_values must be [N, *{expected}], got shape {tuple(pixel_values.shape)}")
        weight = self.embeddings.patch_embedding.weight
        x = self.embeddings(pixel_values.to(weight.device, weight.dtype))
        if cfg.class_token:
            x = self.pre_layrnorm(x)
        for layer in self.encoder.layers:
            x = checkpoint(layer, x, use_reentrant=False) if self.activation_checkpointing else layer(x)
        return x[:, 1:] if cfg.class_token else x
