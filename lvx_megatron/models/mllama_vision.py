"""The Llama-3.2-Vision (mllama) image encoder and projector as plain torch modules.

Numerically the function of transformers' ``MllamaVisionModel`` (with SDPA attention) and of the
``multi_modal_projector`` Linear of ``MllamaModel``; parameter names and shapes are HF's, so loading a
checkpoint is a prefix change only:

* ``MllamaVisionEncoder.<name>`` is ``vision_model.<name>`` in the hub files and
  ``model.vision_model.<name>`` in transformers 5's ``MllamaForConditionalGeneration``;
* ``MultiModalProjector.weight/bias`` is ``multi_modal_projector.weight/bias`` in the hub files and
  ``model.multi_modal_projector.weight/bias`` in transformers 5.

Reference semantics kept on purpose (they are what the checkpoints were trained with):

* The attention mask hides a key from a query only when *both* are padding (padded patch or padded
  tile); real tokens do attend to the padding tokens, so padded tiles (and their pixels) change the
  real tokens' features. An image whose tiles are all padded attends uniformly.
* The CLS token is prepended after the pre-tile embedding, so it gets no pre-tile embedding.
* ``layernorm_pre``/``layernorm_post`` use eps 1e-5 whatever ``norm_eps`` is.
* Output features are ``[final, interleaved intermediates]``: feature ``hidden_size + d * K + k`` is
  channel ``d`` of the ``k``-th of the ``K`` intermediate layers.
"""

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

_PAD_MULTIPLE = 8  # the reference pads each tile's token sequence to a multiple of 8
_POSITIVE_INT_FIELDS = (
    "hidden_size",
    "num_hidden_layers",
    "attention_heads",
    "intermediate_size",
    "image_size",
    "patch_size",
    "num_channels",
    "max_num_tiles",
)


def supported_aspect_ratios(max_num_tiles: int) -> tuple[tuple[int, int], ...]:
    """All ``(width, height)`` tile grids with at most ``max_num_tiles`` tiles, in HF's order (id = index + 1)."""
    return tuple(
        (w, h) for w in range(1, max_num_tiles + 1) for h in range(1, max_num_tiles + 1) if w * h <= max_num_tiles
    )


@dataclass(kw_only=True)
class VisionEncoderConfig:
    """Geometry of the mllama vision encoder (HF ``MllamaVisionConfig`` field names).

    ``image_size`` is the tile size in pixels; ``supported_aspect_ratios`` defaults to every grid of at
    most ``max_num_tiles`` tiles, like HF.
    """

    hidden_size: int
    num_hidden_layers: int
    num_global_layers: int
    attention_heads: int
    intermediate_size: int
    image_size: int
    patch_size: int
    num_channels: int = 3
    max_num_tiles: int
    intermediate_layers_indices: Sequence[int]
    norm_eps: float = 1e-5
    supported_aspect_ratios: Sequence[Sequence[int]] | None = None

    def __post_init__(self) -> None:
        minimums = dict.fromkeys(_POSITIVE_INT_FIELDS, 1) | {"num_global_layers": 0}
        for name, low in minimums.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        if self.hidden_size % self.attention_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by attention_heads ({self.attention_heads})"
            )
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size ({self.image_size}) must be divisible by patch_size ({self.patch_size})")
        if not self.norm_eps > 0:
            raise ValueError(f"norm_eps must be > 0, got {self.norm_eps!r}")
        indices = tuple(self.intermediate_layers_indices)
        if not indices or any(not 0 <= i < self.num_hidden_layers for i in indices):
            raise ValueError(
                f"intermediate_layers_indices must be a non-empty list of indices in "
                f"[0, num_hidden_layers={self.num_hidden_layers}), got {list(indices)}"
            )
        self.intermediate_layers_indices = indices
        if self.supported_aspect_ratios is None:
            ratios = supported_aspect_ratios(self.max_num_tiles)
        else:
            ratios = tuple(tuple(r) for r in self.supported_aspect_ratios)
        if not ratios or any(len(r) != 2 or min(r) < 1 or r[0] * r[1] > self.max_num_tiles for r in ratios):
            raise ValueError(
                f"supported_aspect_ratios must be a non-empty list of (width, height) grids of at most "
                f"max_num_tiles={self.max_num_tiles} tiles, got {self.supported_aspect_ratios!r}"
            )
        self.supported_aspect_ratios = ratios

    @property
    def num_patches(self) -> int:
        """Patches per tile, without the CLS token (HF's model attribute ``num_patches`` includes it)."""
        return (self.image_size // self.patch_size) ** 2

    @property
    def vision_output_dim(self) -> int:
        """Width of the encoder output: the final hidden state plus one per intermediate layer."""
        return self.hidden_size * (1 + len(self.intermediate_layers_indices))

    @property
    def max_aspect_ratio_id(self) -> int:
        """Largest aspect-ratio id; id 0 means a padding image."""
        return len(self.supported_aspect_ratios)

    @classmethod
    def from_hf(cls, hf_config: Any) -> "VisionEncoderConfig":
        """From an HF ``MllamaVisionConfig`` or its dict (``config.json["vision_config"]``)."""

        def get(key: str, default: Any = None) -> Any:
            if isinstance(hf_config, Mapping):
                return hf_config.get(key, default)
            return getattr(hf_config, key, default)

        act = get("hidden_act", "gelu")
        if act != "gelu":
            raise ValueError(f"hidden_act must be 'gelu' (exact erf GELU), got {act!r}")
        config = cls(
            hidden_size=get("hidden_size"),
            num_hidden_layers=get("num_hidden_layers"),
            num_global_layers=get("num_global_layers"),
            attention_heads=get("attention_heads"),
            intermediate_size=get("intermediate_size"),
            image_size=get("image_size"),
            patch_size=get("patch_size"),
            num_channels=get("num_channels", 3),
            max_num_tiles=get("max_num_tiles"),
            intermediate_layers_indices=get("intermediate_layers_indices"),
            norm_eps=get("norm_eps", 1e-5),
            supported_aspect_ratios=get("supported_aspect_ratios"),
        )
        declared = get("vision_output_dim")
        if declared is not None and declared != config.vision_output_dim:
            raise ValueError(
                f"vision_output_dim ({declared}) must equal hidden_size * (1 + len(intermediate_layers_indices)) "
                f"= {config.vision_output_dim}"
            )
        return config

    def to_hf_dict(self) -> dict[str, Any]:
        """Keyword arguments of HF's ``MllamaVisionConfig`` describing the same encoder."""
        return {
            "hidden_size": self.hidden_size,
            "hidden_act": "gelu",
            "num_hidden_layers": self.num_hidden_layers,
            "num_global_layers": self.num_global_layers,
            "attention_heads": self.attention_heads,
            "num_channels": self.num_channels,
            "intermediate_size": self.intermediate_size,
            "vision_output_dim": self.vision_output_dim,
            "image_size": self.image_size,
            "patch_size": self.patch_size,
            "norm_eps": self.norm_eps,
            "max_num_tiles": self.max_num_tiles,
            "intermediate_layers_indices": list(self.intermediate_layers_indices),
            "supported_aspect_ratios": [list(r) for r in self.supported_aspect_ratios],
        }


class AspectRatioEmbedding(nn.Module):
    """One tanh-gated vector per (aspect-ratio id, tile), shared by all tokens of the tile."""

    def __init__(self, config: VisionEncoderConfig) -> None:
        super().__init__()
        self.max_num_tiles = config.max_num_tiles
        self.embedding = nn.Embedding(config.max_aspect_ratio_id + 1, config.max_num_tiles * config.hidden_size)
        self.gate = nn.Parameter(torch.zeros(1))

    def forward(self, x: Tensor, aspect_ratio_ids: Tensor) -> Tensor:
        """``x [n, tiles, tokens, hidden]``, ``aspect_ratio_ids [n]``."""
        emb = self.embedding(aspect_ratio_ids).view(-1, self.max_num_tiles, 1, x.shape[-1])
        return x + emb * self.gate.tanh()


class GatedPositionalEmbedding(nn.Module):
    """A per-token embedding and a per-(aspect-ratio id, tile, token) one, mixed by ``1 - tanh(g)`` / ``tanh(g)``."""

    def __init__(self, config: VisionEncoderConfig) -> None:
        super().__init__()
        self.max_num_tiles = config.max_num_tiles
        tokens, hidden = config.num_patches + 1, config.hidden_size
        self.gate = nn.Parameter(torch.zeros(1))
        self.embedding = nn.Parameter(hidden**-0.5 * torch.randn(tokens, hidden))
        self.tile_embedding = nn.Embedding(config.max_aspect_ratio_id + 1, config.max_num_tiles * tokens * hidden)

    def forward(self, x: Tensor, aspect_ratio_ids: Tensor) -> Tensor:
        """``x [n, tiles, tokens, hidden]``, ``aspect_ratio_ids [n]``."""
        gate = self.gate.tanh()
        x = x + (1 - gate) * self.embedding
        tile = self.tile_embedding(aspect_ratio_ids).view(-1, self.max_num_tiles, *self.embedding.shape)
        return x + gate * tile


class VisionAttention(nn.Module):
    """Bias-free multi-head self-attention."""

    def __init__(self, config: VisionEncoderConfig) -> None:
        super().__init__()
        self.num_heads = config.attention_heads
        hidden = config.hidden_size
        self.head_dim = hidden // self.num_heads
        self.q_proj = nn.Linear(hidden, hidden, bias=False)
        self.k_proj = nn.Linear(hidden, hidden, bias=False)
        self.v_proj = nn.Linear(hidden, hidden, bias=False)
        self.o_proj = nn.Linear(hidden, hidden, bias=False)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        """``x [n, s, hidden]``, additive ``mask [n, 1, s, s]``."""
        n, s, hidden = x.shape
        q, k, v = (
            proj(x).view(n, s, self.num_heads, self.head_dim).transpose(1, 2)
            for proj in (self.q_proj, self.k_proj, self.v_proj)
        )
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o_proj(out.transpose(1, 2).reshape(n, s, hidden))


class VisionMLP(nn.Module):
    """``fc2(gelu(fc1(x)))`` with exact (erf) GELU."""

    def __init__(self, config: VisionEncoderConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class VisionLayer(nn.Module):
    """Pre-LN transformer layer; the global encoder's layers scale both branches by ``tanh(gate)``."""

    def __init__(self, config: VisionEncoderConfig, gated: bool) -> None:
        super().__init__()
        self.self_attn = VisionAttention(config)
        self.mlp = VisionMLP(config)
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.norm_eps)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=config.norm_eps)
        self.gated = gated
        if gated:
            self.gate_attn = nn.Parameter(torch.full((1,), math.pi / 4))
            self.gate_ffn = nn.Parameter(torch.full((1,), math.pi / 4))

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        """``x [n, s, hidden]``, additive ``mask [n, 1, s, s]``."""
        h = self.self_attn(self.input_layernorm(x), mask)
        x = x + (self.gate_attn.tanh() * h if self.gated else h)
        h = self.mlp(self.post_attention_layernorm(x))
        return x + (self.gate_ffn.tanh() * h if self.gated else h)


class VisionTransformer(nn.Module):
    """A stack of ``VisionLayer``s under HF's ``layers`` name."""

    def __init__(self, config: VisionEncoderConfig, num_layers: int, gated: bool) -> None:
        super().__init__()
        self.layers = nn.ModuleList(VisionLayer(config, gated) for _ in range(num_layers))

    def forward(self, x: Tensor, mask: Tensor, checkpointed: bool) -> list[Tensor]:
        """The hidden states after 0, 1, ..., ``len(layers)`` layers."""
        outputs = [x]
        for layer in self.layers:
            x = checkpoint(layer, x, mask, use_reentrant=False) if checkpointed else layer(x, mask)
            outputs.append(x)
        return outputs


class MllamaVisionEncoder(nn.Module):
    """The mllama vision tower: tiles -> ``[..., tiles, num_patches + 1, vision_output_dim]`` features.

    Runs in the parameters' dtype (pixel values are cast to it, as HF does). The attention mask is a
    dense ``[images, 1, s, s]`` tensor with ``s = max_num_tiles * round_up(num_patches + 1, 8)``,
    built once per call (~83 MB per image in bf16 for the 560/14 geometry).

    Args:
        config: the encoder geometry.
        activation_checkpointing: recompute each transformer layer in backward instead of keeping its
            activations (``torch.utils.checkpoint``, non-reentrant).
    """

    def __init__(self, config: VisionEncoderConfig, activation_checkpointing: bool = False) -> None:
        super().__init__()
        self.config = config
        self.activation_checkpointing = activation_checkpointing
        hidden = config.hidden_size
        self.patch_embedding = nn.Conv2d(
            config.num_channels, hidden, kernel_size=config.patch_size, stride=config.patch_size, bias=False
        )
        self.class_embedding = nn.Parameter(hidden**-0.5 * torch.randn(hidden))
        self.gated_positional_embedding = GatedPositionalEmbedding(config)
        self.pre_tile_positional_embedding = AspectRatioEmbedding(config)
        self.post_tile_positional_embedding = AspectRatioEmbedding(config)
        # The reference builds these two with LayerNorm's default eps, not norm_eps.
        self.layernorm_pre = nn.LayerNorm(hidden, eps=1e-5)
        self.layernorm_post = nn.LayerNorm(hidden, eps=1e-5)
        self.transformer = VisionTransformer(config, config.num_hidden_layers, gated=False)
        self.global_transformer = VisionTransformer(config, config.num_global_layers, gated=True)

    def forward(self, pixel_values: Tensor, aspect_ratio_ids: Tensor, aspect_ratio_mask: Tensor) -> Tensor:
        """Encode a batch of image lists (HF ``MllamaVisionModel(...).last_hidden_state``).

        Args:
            pixel_values: ``[B, N, T, C, H, W]``, ``T = max_num_tiles``, ``H = W = image_size``.
            aspect_ratio_ids: ``[B, N]`` ids in ``[0, max_aspect_ratio_id]``; 0 marks a padding image.
            aspect_ratio_mask: ``[B, N, T]``, 1 for real tiles, 0 for padded ones.

        Returns:
            ``[B, N, T, num_patches + 1, vision_output_dim]`` (CLS token first); padded tiles and images too.
        """
        if pixel_values.dim() != 6:
            raise ValueError(f"pixel_values must be [B, N, T, C, H, W], got shape {tuple(pixel_values.shape)}")
        b, n = pixel_values.shape[:2]
        out = self.encode_images(
            pixel_values.flatten(0, 1), aspect_ratio_ids.flatten(0, 1), aspect_ratio_mask.flatten(0, 1)
        )
        return out.unflatten(0, (b, n))

    def encode_images(self, pixel_values: Tensor, aspect_ratio_ids: Tensor, aspect_ratio_mask: Tensor) -> Tensor:
        """Encode a flat list of independent images; ``N = 0`` gives an empty ``[0, T, P + 1, D]`` result.

        Args:
            pixel_values: ``[N, T, C, H, W]``.
            aspect_ratio_ids: ``[N]``.
            aspect_ratio_mask: ``[N, T]``.

        Returns:
            ``[N, T, num_patches + 1, vision_output_dim]``.
        """
        cfg = self.config
        tiles, tokens = cfg.max_num_tiles, cfg.num_patches + 1
        expected = (tiles, cfg.num_channels, cfg.image_size, cfg.image_size)
        if pixel_values.dim() != 5 or tuple(pixel_values.shape[1:]) != expected:
            raise ValueError(f"pixel_values must be [N, *{expected}], got shape {tuple(pixel_values.shape)}")
        n = pixel_values.shape[0]
        if tuple(aspect_ratio_ids.shape) != (n,) or tuple(aspect_ratio_mask.shape) != (n, tiles):
            raise ValueError(
                f"aspect_ratio_ids must be [{n}] and aspect_ratio_mask [{n}, {tiles}], got "
                f"{tuple(aspect_ratio_ids.shape)} and {tuple(aspect_ratio_mask.shape)}"
            )
        weight = self.patch_embedding.weight
        x = self.patch_embedding(pixel_values.flatten(0, 1).to(weight.device, weight.dtype))
        x = x.flatten(2).transpose(1, 2).unflatten(0, (n, tiles))  # [n, tiles, patches, hidden]
        x = self.pre_tile_positional_embedding(x, aspect_ratio_ids)
        x = torch.cat([self.class_embedding.expand(n, tiles, 1, -1), x], dim=2)
        x = self.gated_positional_embedding(x, aspect_ratio_ids)
        x = self.layernorm_pre(x)

        padded = -(-tokens // _PAD_MULTIPLE) * _PAD_MULTIPLE
        x = F.pad(x, (0, 0, 0, padded - tokens))
        mask = self._attention_mask(aspect_ratio_mask, tokens, padded, x.dtype)

        local = self.transformer(x.flatten(1, 2), mask, self.activation_checkpointing)
        x = self.layernorm_post(local[-1]).unflatten(1, (tiles, padded))
        x = self.post_tile_positional_embedding(x, aspect_ratio_ids)
        x = self.global_transformer(x.flatten(1, 2), mask, self.activation_checkpointing)[-1]
        x = x.unflatten(1, (tiles, padded))[:, :, :tokens]
        # The reference stacks the intermediate layers on a new last dim, i.e. interleaves their channels.
        inter = torch.stack([local[i + 1] for i in cfg.intermediate_layers_indices], dim=-1)
        inter = inter.unflatten(1, (tiles, padded))[:, :, :tokens].flatten(-2)
        return torch.cat([x, inter], dim=-1)

    @staticmethod
    def _attention_mask(aspect_ratio_mask: Tensor, tokens: int, padded: int, dtype: torch.dtype) -> Tensor:
        """Additive ``[n, 1, s, s]`` mask; hides a key from a query only when both are padding (see module doc)."""
        real_token = torch.arange(padded, device=aspect_ratio_mask.device) < tokens
        pad = ~((aspect_ratio_mask != 0).unsqueeze(-1) & real_token).flatten(1)  # [n, tiles * padded]
        both_pad = pad.unsqueeze(-1) & pad.unsqueeze(-2)
        mask = torch.zeros(both_pad.shape, dtype=dtype, device=pad.device).masked_fill_(
            both_pad, torch.finfo(dtype).min
        )
        return mask.unsqueeze(1)


class MultiModalProjector(nn.Linear):
    """``Linear(vision_output_dim -> text hidden size, bias=True)`` mapping vision features to the text width.

    Holds ``weight [text_hidden_size, vision_output_dim]`` and ``bias [text_hidden_size]``, which are
    HF's ``multi_modal_projector.weight/bias`` (hub files) or ``model.multi_modal_projector.weight/bias``
    (transformers 5 ``MllamaForConditionalGeneration``).
    """

    def __init__(
        self,
        vision_output_dim: int,
        text_hidden_size: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(vision_output_dim, text_hidden_size, bias=True, device=device, dtype=dtype)
