"""How ``q_allgather`` splits the heads into chunks whose collectives overlap other chunks' compute.

Pure Python: the implementation and the cost model both call it, and their byte counts must agree
exactly (the LSE all-reduce is counted per chunk, with integer division).
"""

MAX_HEAD_CHUNKS = 4  # a pipeline of 4 hides all but about a quarter of the collectives' time
# Below about this many bytes of gathered queries per chunk, per-message latency outweighs the overlap.
MIN_CHUNK_BYTES = 1 << 20


def head_chunk_count(requested: int | None, kv_heads: int, gathered_q_bytes: int) -> int:
    """The number of chunks: ``requested`` (at most ``kv_heads``), or by size when None.

    By size: as many as give each chunk at least ``MIN_CHUNK_BYTES`` of gathered queries (all
    ranks' rows of its heads), at most ``MAX_HEAD_CHUNKS`` and ``kv_heads``, at least 1.
    """
    if requested is None:
        requested = min(MAX_HEAD_CHUNKS, gathered_q_bytes // MIN_CHUNK_BYTES)
    return max(1, min(requested, kv_heads))


def head_chunk_bounds(kv_heads: int, chunks: int) -> list[tuple[int, int]]:
    """``[start, stop)`` K/V heads of each chunk: whole GQA groups, the first chunks one longer when uneven."""
    base, extra = divmod(kv_heads, chunks)
    bounds, start = [], 0
    for c in range(chunks):
        stop = start + base + (1 if c < extra else 0)
        bounds.append((start, stop))
        start = stop
    return bounds
