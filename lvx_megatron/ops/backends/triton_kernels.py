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
its key block's sums in registers (fp32) and walks all packed query rows. ``dQ``: split-KV like
the forward, each program sums its rows' ``dQ`` over one KV split in registers and adds it once
into an fp32 buffer (adding per key tile from the ``dK``/``dV`` kernel instead costs one atomic
per ``BLOCK_N`` flops and ran at a sixth of the speed on an H100). ``P`` is rebuilt from the
*global* LSE and ``dS = P * (dP - D)`` uses the global ``D = rowsum(dO * O)``, so each KV shard's
gradients are exact parts of the full gradients.

Masks. ``MASK_MODE`` 0: none (bounds only). 1: a dense ``[B, Sq, Skv]`` bool tensor. 2: the compact
form of the ops API: an int32 image id per key (``-1`` padding) and per query token a bitset of
visible ids (``W`` int32 words). 3: ids only (every row sees every non-padding key). Visual ids come
in long runs (one image tile is 1601 tokens), so a key tile usually holds one id: its visibility is
then one bit per row, and tiles that no row of the block can see (padding, images the text may not
see) are skipped without any matmul. Rows that see no key get ``O = 0``, ``LSE = -inf`` and zero
gradients; all accumulation is fp32.
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
    MASK,
    QBITS,
    KV_IDS,
    b,
    qi,
    cols,
    row_ok,
    col_ok,
    stride_mb,
    stride_mq,
    stride_bb,
    stride_bq,
    stride_ib,
    MASK_MODE: tl.constexpr,
    NUM_WORDS: tl.constexpr,
    SKIP: tl.constexpr,
    T: tl.constexpr,
):
    """``(visible, live)``: which (row, key) pairs attend (``[BLOCK_M, BLOCK_N]``, or ``[BLOCK_N, BLOCK_M]``
    with ``T``), and whether any does.

    With ``SKIP`` a tile that no row sees (``live`` False) is skipped by the caller; without it
    ``live`` is the constant True, so the key loads stay outside any branch and pipeline.
    """
    rr, cc = _pair(row_ok, col_ok, T)
    base = rr & cc
    if MASK_MODE == 0:
        visible = base
    elif MASK_MODE == 1:
        qq, kk = _pair(qi, cols, T)
        m = tl.load(MASK + b * stride_mb + qq * stride_mq + kk, mask=base, other=0)
        visible = base & (m != 0)
    elif MASK_MODE == 3:
        ids = tl.load(KV_IDS + b * stride_ib + cols, mask=col_ok, other=-1)
        visible = base & _pair(row_ok, ids >= 0, T)[1]
    else:
        ids = tl.load(KV_IDS + b * stride_ib + cols, mask=col_ok, other=-1)
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
    if SKIP:
        return visible, tl.max(tl.max(visible.to(tl.int32), 1), 0) > 0
    else:
        return visible, True


@triton.jit
def _fwd_kernel(
    Q,
    K,
    V,
    MASK,
    QBITS,
    KV_IDS,
    O_OUT,
    LSE_OUT,
    sm_scale,
    SQ,
    SKV,
    split_len,
    stride_qb,
    stride_qs,
    stride_qh,
    stride_kb,
    stride_ks,
    stride_kh,
    stride_vb,
    stride_vs,
    stride_vh,
    stride_mb,
    stride_mq,
    stride_bb,
    stride_bq,
    stride_ib,
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
    SKIP: tl.constexpr,
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
    start = pid_s * split_len
    end = tl.minimum(start + split_len, SKV)
    for n0 in range(start, end, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_ok = cols < end
        visible, live = _visibility(
            MASK, QBITS, KV_IDS, b, qi, cols, row_ok, col_ok,
            stride_mb, stride_mq, stride_bb, stride_bq, stride_ib, MASK_MODE, NUM_WORDS, SKIP, False,
        )  # fmt: skip
        if live:
            k = _load_keys(K, b, hk, cols, offs_d, stride_kb, stride_ks, stride_kh, col_ok, d_ok)
            s = tl.where(visible, _mm(q, tl.trans(k), IEEE) * qk_scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp2(s - m_safe[:, None])
            alpha = tl.exp2(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, 1)
            v = _load_keys(V, b, hk, cols, offs_d, stride_vb, stride_vs, stride_vh, col_ok, d_ok)
            acc = acc * alpha[:, None] + _mm(p.to(v.dtype), v, IEEE)
            m_i = m_new

    seen = l_i > 0
    o = acc / tl.where(seen, l_i, 1.0)[:, None]
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
def _bwd_dkdv_kernel(
    Q,
    K,
    V,
    DO,
    LSE,
    DELTA,
    MASK,
    QBITS,
    KV_IDS,
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
    stride_mb,
    stride_mq,
    stride_bb,
    stride_bq,
    stride_ib,
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
    SKIP: tl.constexpr,
    IEEE: tl.constexpr,
):
    """``dK``, ``dV`` of one key block: walk every packed query row, keep the sums in registers."""
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
    for m0 in range(0, SQ * G, BLOCK_M):
        _, row_ok, qi, head = _packed_rows(m0, SQ, hk, G, BLOCK_M)
        # The tile is computed transposed ([keys, rows]) so that P^T and dS^T feed the dK/dV
        # matmuls straight from registers, with no transpose of a register tile.
        visible_t, live = _visibility(
            MASK, QBITS, KV_IDS, b, qi, cols, row_ok, col_ok,
            stride_mb, stride_mq, stride_bb, stride_bq, stride_ib, MASK_MODE, NUM_WORDS, SKIP, True,
        )  # fmt: skip
        if live:
            q_t = tl.load(
                Q + b * stride_qb + qi[None, :] * stride_qs + head[None, :] * stride_qh + offs_d[:, None],
                mask=row_ok[None, :] & d_ok[:, None],
                other=0.0,
            )
            do = _load_rows(DO, b, qi, head, offs_d, stride_dob, stride_dos, stride_doh, row_ok, d_ok)
            lse = _load_stat(LSE, b, qi, head, stride_lb, stride_ls, stride_lh, row_ok, float("-inf"))
            delta = _load_stat(DELTA, b, qi, head, stride_db, stride_ds, stride_dh, row_ok, 0.0)
            lse2 = _lse_log2(lse)
            p_t = tl.where(visible_t, tl.exp2(_mm(k, q_t, IEEE) * qk_scale - lse2[None, :]), 0.0)
            dv += _mm(p_t.to(do.dtype), do, IEEE)
            ds_t = p_t * (_mm(v, tl.trans(do), IEEE) - delta[None, :])
            dk += _mm(ds_t.to(q_t.dtype), tl.trans(q_t), IEEE)
    out = b * stride_dkb + cols[:, None] * stride_dks + hk * stride_dkh + offs_d[None, :]
    kv_mask = col_ok[:, None] & d_ok[None, :]
    tl.store(DK + out, (dk * sm_scale).to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + out, dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _bwd_dq_kernel(
    Q,
    K,
    V,
    DO,
    LSE,
    DELTA,
    MASK,
    QBITS,
    KV_IDS,
    DQ,
    sm_scale,
    SQ,
    SKV,
    split_len,
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
    stride_mb,
    stride_mq,
    stride_bb,
    stride_bq,
    stride_ib,
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
    SKIP: tl.constexpr,
    IEEE: tl.constexpr,
):
    """``dQ`` of one row block over one KV split (split-KV like the forward), summed in registers
    and added once per program (relaxed fp32 atomics: one add per split, not per key tile)."""
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
    start = pid_s * split_len
    end = tl.minimum(start + split_len, SKV)
    for n0 in range(start, end, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_ok = cols < end
        visible, live = _visibility(
            MASK, QBITS, KV_IDS, b, qi, cols, row_ok, col_ok,
            stride_mb, stride_mq, stride_bb, stride_bq, stride_ib, MASK_MODE, NUM_WORDS, SKIP, False,
        )  # fmt: skip
        if live:
            k = _load_keys(K, b, hk, cols, offs_d, stride_kb, stride_ks, stride_kh, col_ok, d_ok)
            v = _load_keys(V, b, hk, cols, offs_d, stride_vb, stride_vs, stride_vh, col_ok, d_ok)
            p = _probs(q, k, lse, visible, qk_scale, IEEE)
            ds = p * (_mm(do, tl.trans(v), IEEE) - delta[:, None])
            dq += _mm(ds.to(k.dtype), k, IEEE)
    dq_ptrs = DQ + b * stride_dqb + qi[:, None] * stride_dqs + head[:, None] * stride_dqh + offs_d[None, :]
    tl.atomic_add(dq_ptrs, dq * sm_scale, mask=row_ok[:, None] & d_ok[None, :], sem="relaxed")
