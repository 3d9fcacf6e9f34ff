"""Mllama (Llama-3.2-Vision) image tiling and the cross-attention token mask, reimplemented from HF semantics.

Conventions (as in ``transformers.models.mllama``):

* An aspect ratio is a tile arrangement ``(a, b)`` with ``a * b <= max_num_tiles``, listed in the order of
  HF's ``get_all_supported_aspect_ratios``. HF's docstring names the pair (width, height) but its code
  uses the first entry as the number of tile ROWS (canvas height = a * tile_size); we follow the code so
  the ids match HF's processor. The aspect-ratio id is the 1-based index in that list; 0 marks a padding image.
* Tiles are taken row by row (left to right, top to bottom) from the padded canvas.
* Text token ``t`` sees image ``j`` from the image's ``<|image|>`` token until the next ``<|image|>`` token;
  a run of consecutive image tokens forms a group whose images are all seen until the end of the last
  group member's range; a lone image token in a sequence is seen until the end of the (padded) sequence.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

IMAGE_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
IMAGE_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)


@lru_cache(maxsize=32)
def _supported(max_num_tiles: int) -> tuple[tuple[int, int], ...]:
    return tuple(
        (a, b) for a in range(1, max_num_tiles + 1) for b in range(1, max_num_tiles + 1) if a * b <= max_num_tiles
    )


def supported_aspect_ratios(max_num_tiles: int) -> list[tuple[int, int]]:
    """All tile arrangements with at most ``max_num_tiles`` tiles, in HF's order (aspect-ratio id = index + 1)."""
    if max_num_tiles < 1:
        raise ValueError(f"max_num_tiles must be >= 1, got {max_num_tiles}")
    return list(_supported(max_num_tiles))


def aspect_ratio_id(num_tiles_rows: int, num_tiles_cols: int, max_num_tiles: int) -> int:
    """1-based id of the arrangement (rows, cols), as HF's ``convert_aspect_ratios_to_ids``."""
    try:
        return supported_aspect_ratios(max_num_tiles).index((num_tiles_rows, num_tiles_cols)) + 1
    except ValueError:
        raise ValueError(
            f"tile arrangement {num_tiles_rows}x{num_tiles_cols} exceeds max_num_tiles={max_num_tiles}"
        ) from None


def optimal_canvas(height: int, width: int, max_num_tiles: int, tile_size: int) -> tuple[int, int]:
    """(canvas_height, canvas_width) in pixels: the smallest upscale >= 1 if any, else the mildest downscale;
    ties go to the smaller canvas area (then list order), like HF's ``get_optimal_tiled_canvas``."""
    canvases = [(a * tile_size, b * tile_size) for a, b in supported_aspect_ratios(max_num_tiles)]
    scales = [min(ch / height, cw / width) for ch, cw in canvases]
    ups = [s for s in scales if s >= 1]
    chosen = min(ups) if ups else max(scales)
    # min() keeps the first of equal areas, as numpy's argmin in HF.
    return min((c for c, s in zip(canvases, scales, strict=True) if s == chosen), key=lambda c: c[0] * c[1])


def fit_to_canvas(height: int, width: int, canvas_height: int, canvas_width: int, tile_size: int) -> tuple[int, int]:
    """(new_height, new_width) of the image resized into the canvas with its aspect ratio kept (HF's rule:
    each side is first clipped to [tile_size, canvas side], then the tighter scale wins)."""
    target_w = min(max(width, tile_size), canvas_width)
    target_h = min(max(height, tile_size), canvas_height)
    scale_h, scale_w = target_h / height, target_w / width
    if scale_w < scale_h:
        return min(math.floor(height * scale_w) or 1, target_h), target_w
    return target_h, min(math.floor(width * scale_h) or 1, target_w)


def _resize(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of float [N, 3, H, W] (antialiased when shrinking, like HF's default)."""
    if tuple(images.shape[-2:]) == size:
        return images
    return F.interpolate(images, size=size, mode="bilinear", align_corners=False, antialias=True)


def tile_images(images: np.ndarray, tile_size: int, max_num_tiles: int) -> tuple[torch.Tensor, int]:
    """Tile a stack of same-size uint8 [N, H, W, 3] images -> (float32 [N, T_used, 3, tile, tile], aspect_ratio_id).

    Steps as HF: choose the canvas, resize keeping the aspect ratio, zero-pad (black) right/bottom, split
    into tiles row by row, rescale to [0, 1] and normalize with the CLIP mean/std.
    """
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must be uint8 [N, H, W, 3], got shape {tuple(images.shape)}")
    if tile_size < 1:
        raise ValueError(f"tile_size must be >= 1, got {tile_size}")
    n, h, w, _ = images.shape
    ch, cw = optimal_canvas(h, w, max_num_tiles, tile_size)
    rows, cols = ch // tile_size, cw // tile_size
    nh, nw = fit_to_canvas(h, w, ch, cw, tile_size)
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float()
    x = _resize(x, (nh, nw)).clamp_(0, 255) / 255.0
    canvas = torch.zeros(n, 3, ch, cw, dtype=torch.float32)
    canvas[:, :, :nh, :nw] = x
    mean = torch.tensor(IMAGE_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGE_STD).view(1, 3, 1, 1)
    canvas = (canvas - mean) / std
    tiles = canvas.view(n, 3, rows, tile_size, cols, tile_size).permute(0, 2, 4, 1, 3, 5)
    tiles = tiles.reshape(n, rows * cols, 3, tile_size, tile_size).contiguous()
    return tiles, aspect_ratio_id(rows, cols, max_num_tiles)


def tile_image(image: np.ndarray, tile_size: int, max_num_tiles: int) -> tuple[torch.Tensor, int]:
    """Tile one uint8 [H, W, 3] image -> (float32 [T_used, 3, tile, tile], aspect_ratio_id)."""
    if image.ndim != 3:
        raise ValueError(f"image must be uint8 [H, W, 3], got shape {tuple(image.shape)}")
    tiles, ar_id = tile_images(image[None], tile_size, max_num_tiles)
    return tiles[0], ar_id


def cross_attention_ranges(token_ids: Sequence[int], image_id: int) -> list[tuple[int, int]]:
    """Per image: the [start, end) token range that sees it (end -1 = end of the padded sequence), HF semantics."""
    locs = [i for i, t in enumerate(token_ids) if int(t) == image_id]
    if not locs:
        return []
    if len(locs) == 1:
        return [(locs[0], -1)]
    ends = [*locs[1:], len(token_ids)]
    # Walk backwards: an image token followed directly by another one inherits that one's end.
    for k in range(len(locs) - 2, -1, -1):
        if ends[k] == locs[k] + 1:
            ends[k] = ends[k + 1]
    return list(zip(locs, ends, strict=True))


def cross_attention_token_mask(
    token_ids: Sequence[int],
    image_id: int,
    tile_mask: torch.Tensor | None = None,
    length: int | None = None,
) -> torch.Tensor:
    """int64 mask of which text token sees which image: [S, N_img], or [S, N_img, T] given ``tile_mask``.

    ``token_ids`` is the unpadded sequence; ``length`` (default its length) is the padded length S.
    ``tile_mask`` is an int/bool [N_img, T] mask of real tiles (the aspect-ratio mask); N_img may exceed the
    number of image tokens (padding images, all zero). Equals HF's ``convert_sparse_cross_attention_mask_to_dense``.
    """
    s = len(token_ids) if length is None else length
    if s < len(token_ids):
        raise ValueError(f"length ({s}) must be >= len(token_ids) ({len(token_ids)})")
    ranges = cross_attention_ranges(token_ids, image_id)
    n_img = len(ranges) if tile_mask is None else tile_mask.shape[0]
    if len(ranges) > n_img:
        raise ValueError(f"{len(ranges)} image tokens but tile_mask has only {n_img} images")
    mask = torch.zeros(s, n_img, dtype=torch.int64)
    for j, (start, end) in enumerate(ranges):
        mask[start : (s if end == -1 else min(end, s)), j] = 1
    if tile_mask is None:
        return mask
    return mask[:, :, None] * tile_mask.to(torch.int64)[None]
