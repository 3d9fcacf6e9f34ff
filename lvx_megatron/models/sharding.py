"""How a sample's text and images are split over the context-parallel group.

Text is split into equal contiguous pieces in rank order (the text attention and the RoPE rows
assume that). Images are the unit of the visual split, because the tiles of one image attend to
each other in the vision encoder: rank ``r`` encodes a contiguous run of whole images, the first
``N % cp`` ranks one more than the others. When a sample has fewer images than CP ranks, the last
ranks hold no image and an empty visual shard; the query ring still passes through them, so
every text row still sees every image.
"""


def image_range(num_images: int, cp_size: int, cp_rank: int) -> tuple[int, int]:
    """``(start, stop)`` of the images this CP rank encodes."""
    base, extra = divmod(num_images, cp_size)
    start = cp_rank * base + min(cp_rank, extra)
    return start, start + base + (1 if cp_rank < extra else 0)


def text_range(seq_length: int, cp_size: int, cp_rank: int) -> tuple[int, int]:
    """``(start, stop)`` of this CP rank's text tokens (``seq_length`` divisible by ``cp_size``)."""
    if seq_length % cp_size:
        raise ValueError(f"seq_length ({seq_length}) must be divisible by the context-parallel size ({cp_size})")
    piece = seq_length // cp_size
    return cp_rank * piece, (cp_rank + 1) * piece
