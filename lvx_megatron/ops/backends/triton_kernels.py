"""Triton kernels for the query ring's block shape: a small query block against a long local K/V shard.

Layout. The ``G = Hq / Hkv`` query heads of one key/value head are packed into the row dimension:
packed row ``r`` of key/value head ``h`` is query token ``r // G`` of query head ``h * G + r % G``,
read in place from ``[B, Sq, Hq, D]`` (neighbouring rows are neighbouring heads of one token, one
contiguous load). K/V are read once per key/value head and never expanded.

Forward (split-KV). The grid is (row blocks, KV splits, batch x K/V heads): a 64-token query block
with GQA 4 is only 256 rows, so without splitting the keys an H100 would run a few dozen thread
blocks. Each split writes a partial ``(O, LSE)`` in fp32 and a combine kernel merges them with
LSE weights; with one split the forward writes the final result directly.

Backward: two kernels. ``dK``/``dV``: the grid is (KV blocks, batch x K/V heads), each program keeps
its key block's sums in registers (fp32) and walks the packed query rows. ``dQ``: split-KV like
the forward, each program sums its rows' ``dQ`` over its share of the keys in registers and adds
it once into an fp32 buffer (adding per key tile from the ``dK``/``dV`` kernel instead costs one
atomic per ``BLOCK_N`` flops and ran at a sixth of the speed on an H100). ``P`` is rebuilt from
the *global* LSE and ``dS = P * (dP - D)`` uses the global ``D = rowsum(dO * O)``, so each KV
shard's gradients are exact parts of the full gradients.

Masks (``MASK_MODE`` 0: none; 2: image bitsets per query token and an int32 image id per key;
3: ids only, every row sees every non-padding key). A masked call walks the tile lists of its
:class:`~lvx_megatron.ops.masks.BlockMask` (:meth:`~lvx_megatron.ops.masks.BlockMask.tiles`):
per row tile (forward, ``dQ``) or per key tile (``dK``/``dV``) the runs of consecutive *full*
tiles, each walked by the plain unmasked inner loop, and the indices of the *partial* ones, which
apply the per-row bits; empty tiles are in neither and never loaded. A call whose tile lists hold
no partial tile compiles without the partial loop (``HAS_PARTIAL``): the partial path's registers
and code do not weigh on the full tiles. Split-KV programs take equal
shares of the full and of the partial tiles.
In partial tiles, keys a row does not see are selected away (``where``, never ``0 *``), and the
K/V rows entering a product are sanitised, so NaN or Inf in padding or hidden images cannot reach
any row that does not see them (a row that sees a non-finite value gets NaN). Rows that see no
key get ``O = 0``, ``LSE = -inf`` and zero gradients; all accumulation is fp32.
"""

import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)  # globals a kernel reads must be constexpr instances
LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _load_rows(ptr, b, qi, head, offs_d, stride_b, stride_s, stride_h, row_ok, d_ok):
    """A ``[BLOCK_M, BLOCK_D]`` tile of packed rows from a ``[B, S, H, D]`` tensor (zeros outside)."""
    ptrs = ptr + b * stride_b + qi[:, None] * stride_s + head[:, None] * stride_h + offs_d[None, :]
    return tl.load(ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)


@triton.jit
def _load_keys(ptr, b, hk, cols, offs_d, stride_b, stride_s, stride_h, col_ok, d_ok):
    """A ``[BLOCK_N, BLOCK_D]`` tile of key/value head ``hk`` from a ``[B, S, H, D]`` tensor."""
    ptrs = ptr + b * stride_b + cols[:, None] * stride_s + hk * stride_h + offs_d[None, :]
    return tl.load(ptrs, mask=col_ok[:, None] & d_ok[None, :], other=0.0)


@triton.jit
def _mm(a, b, IEEE: tl.constexpr):
    """``a @ b`` with fp32 accumulation; exact fp32 products for fp32 inputs (no TF32)."""
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _packed_rows(first, SQ, hk, G: tl.constexpr, BLOCK_M: tl.constexpr):
    """Packed rows ``first ..`` of key/value head ``hk``: ``(rows, in bounds, query token, query head)``."""
    rows = first + tl.arange(0, BLOCK_M)
    return rows, rows < SQ * G, rows // G, hk * G + rows % G


@triton.jit
def _load_stat(ptr, b, qi, head, stride_b, stride_s, stride_h, row_ok, other):
    """A ``[BLOCK_M]`` per-row statistic (LSE, delta) of packed rows from a ``[B, Sq, Hq]`` tensor."""
    return tl.load(ptr + b * stride_b + qi * stride_s + head * stride_h, mask=row_ok, other=other)


@triton.jit
def _lse_log2(lse):
    """The LSE in the exp2 domain; rows that see no key (``-inf``) become ``+inf``, so ``P = 0``."""
    return tl.where(lse == float("-inf"), float("inf"), lse) * LOG2E


@triton.jit
def _probs(q, k, lse, visible, qk_scale, IEEE: tl.constexpr):
    """``P`` of a (rows, keys) tile from the global LSE (natural log)."""
    return tl.where(visible, tl.exp2(_mm(q, tl.trans(k), IEEE) * qk_scale - _lse_log2(lse)[:, None]), 0.0)


@triton.jit
def _pair(r, c, T: tl.constexpr):
    """``(row view, key view)`` of a per-row and a per-key vector, broadcasting to a ``[rows, keys]``
    tile, or to ``[keys, rows]`` with ``T``."""
    if T:
        return r[None, :], c[:, None]
    else:
        return r[:, None], c[None, :]


@triton.jit
def _visibility(
    QBITS,
    KV_IDS,
    b,
    qi,
    cols,
    row_ok,
    col_ok,
    stride_bb,
    stride_bq,
    stride_ib,
    MASK_MODE: tl.constexpr,
    NUM_WORDS: tl.constexpr,
    T: tl.constexpr,
):
    """Which (row, key) pairs of a partial tile attend: ``[BLOCK_M, BLOCK_N]``, or ``[BLOCK_N, BLOCK_M]`` with ``T``."""
    rr, cc = _pair(row_ok, col_ok, T)
    base = rr & cc
    ids = tl.load(KV_IDS + b * stride_ib + cols, mask=col_ok, other=-1)
    if MASK_MODE == 3:
        visible = base & _pair(row_ok, ids >= 0, T)[1]
    else:
        lo = tl.min(tl.where(col_ok, ids, 2147483647))
        hi = tl.max(ids)
        if (lo == hi) & (lo >= 0):
            # One id in the whole tile: one bit per row.
            word = tl.load(QBITS + b * stride_bb + qi * stride_bq + lo // 32, mask=row_ok, other=0)
            visible = base & _pair(((word >> (lo % 32)) & 1) != 0, col_ok, T)[0]
        else:
            seen = tl.zeros(base.shape, dtype=tl.int1)
            for w in tl.static_range(NUM_WORDS):
                word = tl.load(QBITS + b * stride_bb + qi * stride_bq + w, mask=row_ok, other=0)
                ww, ii = _pair(word, ids, T)
                seen = seen | (((ii >> 5) == w) & (((ww >> (ii & 31)) & 1) != 0))
            visible = base & _pair(row_ok, ids >= 0, T)[1] & seen
    return visible


@triton.jit
def _finite(x):
    return (x == x) & (tl.abs(x) != float("inf"))


@triton.jit
def _share(count, part, parts):
    """``[lo, hi)``: the entries of a list of ``count`` that program ``part`` of ``parts`` takes."""
    per = tl.cdiv(count, parts)
    lo = part * per
    return lo, tl.minimum(lo + per, count)


@triton.jit
def _run_span(RUN_START, RUN_LEN, RUN_POS, at, lo, hi):
    """``[first, last)``: the tiles of the full-tile run at ``at`` that fall in positions ``[lo, hi)``."""
    position = tl.load(RUN_POS + at)
    offset = tl.load(RUN_START + at) - position  # tile = position + offset inside the run
    return tl.maximum(lo, position) + offset, tl.minimum(hi, position + tl.load(RUN_LEN + at)) + offset


@triton.jit
def _fwd_tile(
    acc,
    m_i,
    l_i,
    bad,
    q,
    K,
    V,
    QBITS,
    KV_IDS,
    b,
    hk,
    qi,
    row_ok,
    cols,
    col_ok,
    offs_d,
    d_ok,
    qk_scale,
    stride_kb,
    stride_ks,
    stride_kh,
    stride_vb,
    stride_vs,
    stride_vh,
    stride_bb,
    stride_bq,
    stride_ib,
    MASK_MODE: tl.constexpr,
    NUM_WORDS: tl.constexpr,
    PARTIAL: tl.constexpr,
    IEEE: tl.constexpr,
):
    """One key tile of the forward's online softmax; ``bad`` marks rows that saw a non-finite value."""
    if PARTIAL:
        visible = _visibility(
            QBITS, KV_IDS, b, qi, cols, row_ok, col_ok, stride_bb, stride_bq, stride_ib, MASK_MODE, NUM_WORDS, False
        )
    else:
        visible = row_ok[:, None] & col_ok[None, :]
    k = _load_keys(K, b, hk, cols, offs_d, stride_kb, stride_ks, stride_kh, col_ok, d_ok)
    s = tl.where(visible, _mm(q, tl.trans(k), IEEE) * qk_scale, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(s - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    v = _load_keys(V, b, hk, cols, offs_d, stride_vb, stride_vs, stride_vh, col_ok, d_ok)
    if PARTIAL:
        v_ok = _finite(v)
        key_bad = tl.max((~v_ok).to(tl.int32), 1) > 0
        bad = bad | (tl.max((visible & key_bad[None, :]).to(tl.int32), 1) > 0)
        v = tl.where(v_ok, v, 0.0)
    acc = acc * alpha[:, None] + _mm(p.to(v.dtype), v, IEEE)
    return acc, m_new, l_i, bad


@triton.jit
def _fwd_kernel(
    Q,
    K,
    V,
    QBITS,
    KV_IDS,
    FULL_CNT,
    RUN_CNT,
    RUN_START,
    RUN_LEN,
    RUN_POS,
    PART_CNT,
    PART_IDX,
    O_OUT,
    LSE_OUT,
    sm_scale,
    SQ,
    SKV,
    split_len,
    num_splits,
    stride_qb,
    stride_qs,
    stride_qh,
    stride_kb,
    stride_ks,
    stride_kh,
    stride_vb,
    stride_vs,
    stride_vh,
    stride_bb,
    stride_bq,
    stride_ib,
    stride_cb,
    stride_xb,
    stride_xt,
    # partial outputs [B * Hkv, splits, rows, D] / [B * Hkv, splits, rows] (fp32), or, with
    # DIRECT, the final O [B, Sq, Hq, D] and LSE [B, Sq, Hq]
    stride_ob,
    stride_os,
    stride_oh,
    stride_lb,
    stride_ls,
    stride_lh,
    HKV: tl.constexpr,
    G: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    MASK_MODE: tl.constexpr,
    NUM_WORDS: tl.constexpr,
    HAS_PARTIAL: tl.constexpr,
    DIRECT: tl.constexpr,
    IEEE: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    pid_bh = tl.program_id(2)
    b = pid_bh // HKV
    hk = pid_bh % HKV
    rows, row_ok, qi, head = _packed_rows(pid_m * BLOCK_M, SQ, hk, G, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    q = _load_rows(Q, b, qi, head, offs_d, stride_qb, stride_qs, stride_qh, row_ok, d_ok)
    qk_scale = sm_scale * LOG2E  # exp2 domain

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    bad = tl.zeros([BLOCK_M], dtype=tl.int1)
    if MASK_MODE == 0:
        start = pid_s * split_len
        end = tl.minimum(start + split_len, SKV)
        for n0 in range(start, end, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            acc, m_i, l_i, bad = _fwd_tile(
                acc, m_i, l_i, bad, q, K, V, QBITS, KV_IDS, b, hk, qi, row_ok, cols, cols < end, offs_d, d_ok,
                qk_scale, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
                stride_bb, stride_bq, stride_ib, MASK_MODE, NUM_WORDS, False, IEEE,
            )  # fmt: skip
    else:
        lists = b * stride_xb + pid_m * stride_xt
        lo, hi = _share(tl.load(FULL_CNT + b * stride_cb + pid_m), pid_s, num_splits)
        for r in range(0, tl.load(RUN_CNT + b * stride_cb + pid_m)):
            first, last = _run_span(RUN_START, RUN_LEN, RUN_POS, lists + r, lo, hi)
            for n0 in range(first * BLOCK_N, last * BLOCK_N, BLOCK_N):
                cols = n0 + tl.arange(0, BLOCK_N)
                acc, m_i, l_i, bad = _fwd_tile(
                    acc, m_i, l_i, bad, q, K, V, QBITS, KV_IDS, b, hk, qi, row_ok, cols, cols < SKV, offs_d, d_ok,
                    qk_scale, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
                    stride_bb, stride_bq, stride_ib, MASK_MODE, NUM_WORDS, False, IEEE,
                )  # fmt: skip
        if HAS_PARTIAL:
            lo, hi = _share(tl.load(PART_CNT + b * stride_cb + pid_m), pid_s, num_splits)
            for i in range(lo, hi):
                cols = tl.load(PART_IDX + lists + i) * BLOCK_N + tl.arange(0, BLOCK_N)
                acc, m_i, l_i, bad = _fwd_tile(
                    acc, m_i, l_i, bad, q, K, V, QBITS, KV_IDS, b, hk, qi, row_ok, cols, cols < SKV, offs_d, d_ok,
                    qk_scale, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
                    stride_bb, stride_bq, stride_ib, MASK_MODE, NUM_WORDS, True, IEEE,
                )  # fmt: skip

    seen = l_i > 0
    o = acc / tl.where(seen, l_i, 1.0)[:, None]
    o = tl.where(bad[:, None], float("nan"), o)
    lse = tl.where(seen, (m_i + tl.log2(tl.where(seen, l_i, 1.0))) * LN2, float("-inf"))
    if DIRECT:
        o_ptrs = O_OUT + b * stride_ob + qi[:, None] * stride_os + head[:, None] * stride_oh + offs_d[None, :]
        tl.store(o_ptrs, o.to(O_OUT.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
        tl.store(LSE_OUT + b * stride_lb + qi * stride_ls + head * stride_lh, lse, mask=row_ok)
    else:
        o_ptrs = O_OUT + pid_bh * stride_ob + pid_s * stride_os + rows[:, None] * stride_oh + offs_d[None, :]
        tl.store(o_ptrs, o, mask=row_ok[:, None] & d_ok[None, :])
        tl.store(LSE_OUT + pid_bh * stride_lb + pid_s * stride_ls + rows, lse, mask=row_ok)


@triton.jit
def _combine_kernel(
    O_PART,
    LSE_PART,
    OUT,
    LSE,
    SQ,
    NUM_SPLITS,
    stride_pb,
    stride_ps,
    stride_pr,
    stride_lpb,
    stride_lps,
    stride_ob,
    stride_os,
    stride_oh,
    stride_lb,
    stride_ls,
    stride_lh,
    HKV: tl.constexpr,
    G: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """Merge the splits' partial ``(O, LSE)`` with weights ``exp(LSE_s - LSE)``; write final O, LSE."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // HKV
    hk = pid_bh % HKV
    rows, row_ok, qi, head = _packed_rows(pid_m * BLOCK_M, SQ, hk, G, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    lse_base = LSE_PART + pid_bh * stride_lpb + rows
    m = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    for s in range(0, NUM_SPLITS):
        m = tl.maximum(m, tl.load(lse_base + s * stride_lps, mask=row_ok, other=float("-inf")))
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    total = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for s in range(0, NUM_SPLITS):
        w = tl.exp(tl.load(lse_base + s * stride_lps, mask=row_ok, other=float("-inf")) - m_safe)
        part = tl.load(
            O_PART + pid_bh * stride_pb + s * stride_ps + rows[:, None] * stride_pr + offs_d[None, :],
            mask=row_ok[:, None] & d_ok[None, :],
            other=0.0,
        )
        total += w
        acc += w[:, None] * part
    seen = total > 0
    o = acc / tl.where(seen, total, 1.0)[:, None]
    lse = tl.where(seen, m_safe + tl.log(tl.where(seen, total, 1.0)), float("-inf"))
    o_ptrs = OUT + b * stride_ob + qi[:, None] * stride_os + head[:, None] * stride_oh + offs_d[None, :]
    tl.store(o_ptrs, o.to(OUT.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    tl.store(LSE + b * stride_lb + qi * stride_ls + head * stride_lh, lse, mask=row_ok)


@triton.jit
def _dkdv_tile(
    dk,
    dv,
    k,
    v,
    Q,
    DO,
    LSE,
    DELTA,
    QBITS,
    KV_IDS,
    b,
    hk,
    m0,
    SQ,
    cols,
    col_ok,
    offs_d,
    d_ok,
    qk_scale,
    stride_qb,
    stride_qs,
    stride_qh,
    stride_dob,
    stride_dos,
    stride_doh,
    stride_lb,
    stride_ls,
    stride_lh,
    stride_db,
    stride_ds,
    stride_dh,
    stride_bb,
    stride_bq,
    stride_ib,
    G: tl.constexpr,
    BLOCK_M: tl.constexpr,
    MASK_MODE: tl.constexpr,
    NUM_WORDS: tl.constexpr,
    PARTIAL: tl.constexpr,
    IEEE: tl.constexpr,
):
    """One row tile's contribution to a key tile's ``dK``, ``dV``.

    The tile is computed transposed ([keys, rows]) so that P^T and dS^T feed the dK/dV matmuls
    straight from registers, with no transpose of a register tile.
    """
    _, row_ok, qi, head = _packed_rows(m0, SQ, hk, G, BLOCK_M)
    if PARTIAL:
        visible_t = _visibility(
            QBITS, KV_IDS, b, qi, cols, row_ok, col_ok, stride_bb, stride_bq, stride_ib, MASK_MODE, NUM_WORDS, True
        )
    else:
        visible_t = col_ok[:, None] & row_ok[None, :]
    q_t = tl.load(
        Q + b * stride_qb + qi[None, :] * stride_qs + head[None, :] * stride_qh + offs_d[:, None],
        mask=row_ok[None, :] & d_ok[:, None],
        other=0.0,
    )
    do = _load_rows(DO, b, qi, head, offs_d, stride_dob, stride_dos, stride_doh, row_ok, d_ok)
    lse = _load_stat(LSE, b, qi, head, stride_lb, stride_ls, stride_lh, row_ok, float("-inf"))
    delta = _load_stat(DELTA, b, qi, head, stride_db, stride_ds, stride_dh, row_ok, 0.0)
    p_t = tl.where(visible_t, tl.exp2(_mm(k, q_t, IEEE) * qk_scale - _lse_log2(lse)[None, :]), 0.0)
    dv += _mm(p_t.to(do.dtype), do, IEEE)
    ds_t = p_t * (_mm(v, tl.trans(do), IEEE) - delta[None, :])
    if PARTIAL:  # a hidden key's non-finite V must not become 0 * NaN
        ds_t = tl.where(visible_t, ds_t, 0.0)
    dk += _mm(ds_t.to(q_t.dtype), tl.trans(q_t), IEEE)
    return dk, dv


@triton.jit
def _bwd_dkdv_kernel(
    Q,
    K,
    V,
    DO,
    LSE,
    DELTA,
    QBITS,
    KV_IDS,
    FULL_CNT,
    RUN_CNT,
    RUN_START,
    RUN_LEN,
    RUN_POS,
    PART_CNT,
    PART_IDX,
    DK,
    DV,
    sm_scale,
    SQ,
    SKV,
    stride_qb,
    stride_qs,
    stride_qh,
    stride_kb,
    stride_ks,
    stride_kh,
    stride_vb,
    stride_vs,
    stride_vh,
    stride_dob,
    stride_dos,
    stride_doh,
    stride_lb,
    stride_ls,
    stride_lh,
    stride_db,
    stride_ds,
    stride_dh,
    stride_bb,
    stride_bq,
    stride_ib,
    stride_cb,
    stride_xb,
    stride_xt,
    stride_dkb,
    stride_dks,
    stride_dkh,
    HKV: tl.constexpr,
    G: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    MASK_MODE: tl.constexpr,
    NUM_WORDS: tl.constexpr,
    HAS_PARTIAL: tl.constexpr,
    IEEE: tl.constexpr,
):
    """``dK``, ``dV`` of one key block: walk the packed query rows, keep the sums in registers."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // HKV
    hk = pid_bh % HKV
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < SKV
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    k = _load_keys(K, b, hk, cols, offs_d, stride_kb, stride_ks, stride_kh, col_ok, d_ok)
    v = _load_keys(V, b, hk, cols, offs_d, stride_vb, stride_vs, stride_vh, col_ok, d_ok)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    qk_scale = sm_scale * LOG2E
    if MASK_MODE == 0:
        for m0 in range(0, SQ * G, BLOCK_M):
            dk, dv = _dkdv_tile(
                dk, dv, k, v, Q, DO, LSE, DELTA, QBITS, KV_IDS, b, hk, m0, SQ, cols, col_ok, offs_d, d_ok, qk_scale,
                stride_qb, stride_qs, stride_qh, stride_dob, stride_dos, stride_doh, stride_lb, stride_ls, stride_lh,
                stride_db, stride_ds, stride_dh, stride_bb, stride_bq, stride_ib,
                G, BLOCK_M, MASK_MODE, NUM_WORDS, False, IEEE,
            )  # fmt: skip
    else:
        lists = b * stride_xb + pid_n * stride_xt
        for r in range(0, tl.load(RUN_CNT + b * stride_cb + pid_n)):
            first = tl.load(RUN_START + lists + r)
            for m0 in range(first * BLOCK_M, (first + tl.load(RUN_LEN + lists + r)) * BLOCK_M, BLOCK_M):
                dk, dv = _dkdv_tile(
                    dk, dv, k, v, Q, DO, LSE, DELTA, QBITS, KV_IDS, b, hk, m0, SQ, cols, col_ok, offs_d, d_ok,
                    qk_scale, stride_qb, stride_qs, stride_qh, stride_dob, stride_dos, stride_doh,
                    stride_lb, stride_ls, stride_lh,
                    stride_db, stride_ds, stride_dh, stride_bb, stride_bq, stride_ib,
                    G, BLOCK_M, MASK_MODE, NUM_WORDS, False, IEEE,
                )  # fmt: skip
        if HAS_PARTIAL:
            for i in range(0, tl.load(PART_CNT + b * stride_cb + pid_n)):
                dk, dv = _dkdv_tile(
                    dk, dv, k, v, Q, DO, LSE, DELTA, QBITS, KV_IDS, b, hk, tl.load(PART_IDX + lists + i) * BLOCK_M,
                    SQ, cols, col_ok, offs_d, d_ok, qk_scale,
                    stride_qb, stride_qs, stride_qh, stride_dob, stride_dos, stride_doh, stride_lb, stride_ls,
                    stride_lh, stride_db, stride_ds, stride_dh, stride_bb, stride_bq, stride_ib,
                    G, BLOCK_M, MASK_MODE, NUM_WORDS, True, IEEE,
                )  # fmt: skip
    out = b * stride_dkb + cols[:, None] * stride_dks + hk * stride_dkh + offs_d[None, :]
    kv_mask = col_ok[:, None] & d_ok[None, :]
    tl.store(DK + out, (dk * sm_scale).to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + out, dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _dq_tile(
    dq,
    q,
    do,
    lse,
    delta,
    K,
    V,
    QBITS,
    KV_IDS,
    b,
    hk,
    qi,
    row_ok,
    cols,
    col_ok,
    offs_d,
    d_ok,
    qk_scale,
    stride_kb,
    stride_ks,
    stride_kh,
    stride_vb,
    stride_vs,
    stride_vh,
    stride_bb,
    stride_bq,
    stride_ib,
    MASK_MODE: tl.constexpr,
    NUM_WORDS: tl.constexpr,
    PARTIAL: tl.constexpr,
    IEEE: tl.constexpr,
):
    """One key tile's contribution to a row tile's ``dQ``."""
    if PARTIAL:
        visible = _visibility(
            QBITS, KV_IDS, b, qi, cols, row_ok, col_ok, stride_bb, stride_bq, stride_ib, MASK_MODE, NUM_WORDS, False
        )
    else:
        visible = row_ok[:, None] & col_ok[None, :]
    k = _load_keys(K, b, hk, cols, offs_d, stride_kb, stride_ks, stride_kh, col_ok, d_ok)
    v = _load_keys(V, b, hk, cols, offs_d, stride_vb, stride_vs, stride_vh, col_ok, d_ok)
    p = _probs(q, k, lse, visible, qk_scale, IEEE)
    ds = p * (_mm(do, tl.trans(v), IEEE) - delta[:, None])
    if PARTIAL:  # hidden keys: no 0 * NaN from their V (in dS) or their K (in the product)
        ds = tl.where(visible, ds, 0.0)
        k = tl.where(_finite(k), k, 0.0)
    return dq + _mm(ds.to(k.dtype), k, IEEE)


@triton.jit
def _bwd_dq_kernel(
    Q,
    K,
    V,
    DO,
    LSE,
    DELTA,
    QBITS,
    KV_IDS,
    FULL_CNT,
    RUN_CNT,
    RUN_START,
    RUN_LEN,
    RUN_POS,
    PART_CNT,
    PART_IDX,
    DQ,
    sm_scale,
    SQ,
    SKV,
    split_len,
    num_splits,
    stride_qb,
    stride_qs,
    stride_qh,
    stride_kb,
    stride_ks,
    stride_kh,
    stride_vb,
    stride_vs,
    stride_vh,
    stride_dob,
    stride_dos,
    stride_doh,
    stride_lb,
    stride_ls,
    stride_lh,
    stride_db,
    stride_ds,
    stride_dh,
    stride_bb,
    stride_bq,
    stride_ib,
    stride_cb,
    stride_xb,
    stride_xt,
    stride_dqb,
    stride_dqs,
    stride_dqh,
    HKV: tl.constexpr,
    G: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    MASK_MODE: tl.constexpr,
    NUM_WORDS: tl.constexpr,
    HAS_PARTIAL: tl.constexpr,
    IEEE: tl.constexpr,
):
    """``dQ`` of one row block over one share of the keys (split-KV like the forward), summed in
    registers and added once per program (relaxed fp32 atomics: one add per split, not per key tile)."""
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    pid_bh = tl.program_id(2)
    b = pid_bh // HKV
    hk = pid_bh % HKV
    _, row_ok, qi, head = _packed_rows(pid_m * BLOCK_M, SQ, hk, G, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    q = _load_rows(Q, b, qi, head, offs_d, stride_qb, stride_qs, stride_qh, row_ok, d_ok)
    do = _load_rows(DO, b, qi, head, offs_d, stride_dob, stride_dos, stride_doh, row_ok, d_ok)
    lse = _load_stat(LSE, b, qi, head, stride_lb, stride_ls, stride_lh, row_ok, float("-inf"))
    delta = _load_stat(DELTA, b, qi, head, stride_db, stride_ds, stride_dh, row_ok, 0.0)
    qk_scale = sm_scale * LOG2E
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    if MASK_MODE == 0:
        start = pid_s * split_len
        end = tl.minimum(start + split_len, SKV)
        for n0 in range(start, end, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            dq = _dq_tile(
                dq, q, do, lse, delta, K, V, QBITS, KV_IDS, b, hk, qi, row_ok, cols, cols < end, offs_d, d_ok,
                qk_scale, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
                stride_bb, stride_bq, stride_ib, MASK_MODE, NUM_WORDS, False, IEEE,
            )  # fmt: skip
    else:
        lists = b * stride_xb + pid_m * stride_xt
        lo, hi = _share(tl.load(FULL_CNT + b * stride_cb + pid_m), pid_s, num_splits)
        for r in range(0, tl.load(RUN_CNT + b * stride_cb + pid_m)):
            first, last = _run_span(RUN_START, RUN_LEN, RUN_POS, lists + r, lo, hi)
            for n0 in range(first * BLOCK_N, last * BLOCK_N, BLOCK_N):
                cols = n0 + tl.arange(0, BLOCK_N)
                dq = _dq_tile(
                    dq, q, do, lse, delta, K, V, QBITS, KV_IDS, b, hk, qi, row_ok, cols, cols < SKV, offs_d, d_ok,
                    qk_scale, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
                    stride_bb, stride_bq, stride_ib, MASK_MODE, NUM_WORDS, False, IEEE,
                )  # fmt: skip
        if HAS_PARTIAL:
            lo, hi = _share(tl.load(PART_CNT + b * stride_cb + pid_m), pid_s, num_splits)
            for i in range(lo, hi):
                cols = tl.load(PART_IDX + lists + i) * BLOCK_N + tl.arange(0, BLOCK_N)
                dq = _dq_tile(
                    dq, q, do, lse, delta, K, V, QBITS, KV_IDS, b, hk, qi, row_ok, cols, cols < SKV, offs_d, d_ok,
                    qk_scale, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
                    stride_bb, stride_bq, stride_ib, MASK_MODE, NUM_WORDS, True, IEEE,
                )  # fmt: skip
    dq_ptrs = DQ + b * stride_dqb + qi[:, None] * stride_dqs + head[:, None] * stride_dqh + offs_d[None, :]
    tl.atomic_add(dq_ptrs, dq * sm_scale, mask=row_ok[:, None] & d_ok[None, :], sem="relaxed")
