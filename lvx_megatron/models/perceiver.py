"""OpenFlamingo's Perceiver Resampler: a fixed number of latents per image from its patch features.

Per image (the ``T`` media of a sample are resampled independently, so a CP rank resamples only
its own images)::

    x = features (+ frame embedding of each frame) (+ media time embedding of the image)
    z = latents                                      # [num_latents, dim], learned
    repeat depth times:
        z = z + W_o attend(W_q LN_z(z), W_kv [LN_x(x); LN_z(z)])   # latents also attend to themselves
        z = z + W_2 gelu(W_1 LN(z))
    out = LN(z)

Attention: ``heads`` x ``head_dim`` (OpenFlamingo: 8 x 64 on a 1024-wide ViT-L/14, depth 6, 64
latents, feed-forward 4 x dim), bias-free linears, scale ``head_dim ** -0.5``, no mask. The time
embeddings exist only when ``max_num_media`` / ``max_num_frames`` are set (OpenFlamingo's released
models set neither).
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(kw_only=True)
class PerceiverConfig:
    """Sizes of the resampler; ``dim`` is the vision tower's width."""

    dim: int
    depth: int = 6
    heads: int = 8
    head_dim: int = 64
    num_latents: int = 64
    ff_mult: int = 4
    max_num_media: int | None = None
    max_num_frames: int | None = None

    def __post_init__(self) -> None:
        for name in ("dim", "depth", "heads", "head_dim", "num_latents", "ff_mult"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        for name in ("max_num_media", "max_num_frames"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be None or an int >= 1, got {value!r}")


class PerceiverAttention(nn.Module):
    """Latents attend to ``[media; latents]`` (one K/V projection for both, K then V in its output)."""

    def __init__(self, config: PerceiverConfig) -> None:
        super().__init__()
        inner = config.heads * config.head_dim
        self.heads = config.heads
        self.media_norm = nn.LayerNorm(config.dim)
        self.latents_norm = nn.LayerNorm(config.dim)
        self.to_q = nn.Linear(config.dim, inner, bias=False)
        self.to_kv = nn.Linear(config.dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, config.dim, bias=False)

    def forward(self, x: Tensor, latents: Tensor) -> Tensor:
        """``x [n, tokens, dim]``, ``latents [n, num_latents, dim]`` -> ``[n, num_latents, dim]``."""
        x, latents = self.media_norm(x), self.latents_norm(latents)
        q = self.to_q(latents)
        k, v = self.to_kv(torch.cat([x, latents], dim=1)).chunk(2, dim=-1)
        n, head_dim = q.shape[0], q.shape[-1] // self.heads
        q, k, v = (t.view(n, t.shape[1], self.heads, head_dim).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out(out.transpose(1, 2).reshape(n, latents.shape[1], self.heads * head_dim))


class PerceiverFeedForward(nn.Module):
    """``fc2(gelu(fc1(LN(x))))``, bias-free linears, exact GELU."""

    def __init__(self, config: PerceiverConfig) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(config.dim)
        self.fc1 = nn.Linear(config.dim, config.ff_mult * config.dim, bias=False)
        self.fc2 = nn.Linear(config.ff_mult * config.dim, config.dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(self.norm(x))))


class PerceiverLayer(nn.Module):
    def __init__(self, config: PerceiverConfig) -> None:
        super().__init__()
        self.attn = PerceiverAttention(config)
        self.ff = PerceiverFeedForward(config)

    def forward(self, x: Tensor, latents: Tensor) -> Tensor:
        latents = latents + self.attn(x, latents)
        return latents + self.ff(latents)


class PerceiverResampler(nn.Module):
    """Media ``[n, frames, tokens, dim]`` -> ``[n, num_latents, dim]``."""

    def __init__(self, config: PerceiverConfig) -> None:
        super().__init__()
        self.config = config
        self.latents = nn.Parameter(torch.zeros(config.num_latents, config.dim))
        if config.max_num_frames is not None:
            self.frame_embs = nn.Parameter(torch.zeros(config.max_num_frames, config.dim))
        if config.max_num_media is not None:
            self.media_time_embs = nn.Parameter(torch.zeros(config.max_num_media, 1, config.dim))
        self.layers = nn.ModuleList(PerceiverLayer(config) for _ in range(config.depth))
        self.norm = nn.LayerNorm(config.dim)

    def forward(self, x: Tensor, media_index: Tensor) -> Tensor:
        """Resample each medium.

        Args:
            x: ``[n, frames, tokens, dim]`` features of ``n`` media.
            media_index: ``[n]`` the index of each medium in its sample (selects its time embedding).
        """
        n, frames = x.shape[:2]
        if hasattr(self, "frame_embs"):
            if frames > self.config.max_num_frames:
                raise ValueError(f"{frames} frames per medium but max_num_frames is {self.config.max_num_frames}")
            x = x + self.frame_embs[:frames, None]
        x = x.flatten(1, 2)
        if hasattr(self, "media_time_embs"):
            if n and int(media_index.max()) >= self.config.max_num_media:
                raise ValueError(
                    f"medium index {int(media_index.max())} but max_num_media is {self.config.max_num_media}"
                )
            x = x + self.media_time_embs[media_index]
        latents = self.latents.expand(n, -1, -1)
        for layer in self.layers:
            latents = layer(x, latents)
        return self.norm(latents)
