"""Triton forward kernels of the chunkwise mLSTM (TFLA-like: a sequential state scan, then parallel chunk outputs).

Layout: q, k (BH, S, DQK), v, h (BH, S, DV) contiguous; gate vectors u, ucm, b (BH, Sp) fp32 with Sp = NC * L
(the tail chunk padded with no-op tokens: u = -inf, b constant). Per chunk c (positions c*L + r, r < L):
b_r = cumulative log sigmoid(f) inside the chunk, u_r = i_r - b_r, ucm_r = max_{j<=r} u_j. With M_c the state
stabiliser before chunk c (M_0 = m0): x_r = max(M_c, ucm_r), row stabiliser m_r = b_r + x_r; every exponent below is
u_j - x_r, M_c - x_r or u_j - x_{L-1}, all <= 0 (the same stabilisers as the torch chunkwise, see chunkwise_forward.py).

Packed documents: `seg_ptr` (BH, Sp) int32, the count of document starts in the chunk up to each row, or None (a
compile-time specialisation: no loads, today's code). b and ucm then restart at each start (the caller's segmented
scans), a row past a start (seg > 0) begins from the empty state (stabiliser 0 instead of M_c, read weight 0), pairs
in different segments get weight 0, the chunk-end state takes only sources of the chunk's last segment, and a chunk
holding a start carries nothing of the state before it (see `_chunk_end`).
"""

import triton
import triton.language as tl

# exp(-m) is clamped at exp(88) = 1.7e38: ln(FLT_MAX) itself rounds up in fp32 and its exp is inf
FLOOR_MAX_EXPONENT = tl.constexpr(88.0)


@triton.jit
def _fp16_operand(x):
    """(x / s as fp16, s) with s a power of two >= max |x|: fp32 tiles (scores, dh / norm, the fp32 states) can exceed
    fp16's 65,504 before a dot; tiles already in fp16 (the inputs) pass unscaled."""
    if x.dtype == tl.float16:
        return x, 1.0
    else:
        big = tl.max(tl.max(tl.abs(x), axis=1), axis=0)
        s = tl.exp2(tl.ceil(tl.log2(tl.maximum(big, 1e-30))))
        return (x / s).to(tl.float16), s


@triton.jit
def _dot(a, b, DT: tl.constexpr, IEEE: tl.constexpr):
    """a @ b with fp32 accumulation: full fp32 ("ieee", no TF32) for fp32 inputs, else operands cast to DT (fp16
    operands scaled into range first)."""
    if IEEE:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    elif DT == tl.float16:  # noqa: SIM300 - DT is the constexpr
        a16, sa = _fp16_operand(a)
        b16, sb = _fp16_operand(b)
        return tl.dot(a16, b16) * (sa * sb)
    else:
        return tl.dot(a.to(DT), b.to(DT))


@triton.jit
def _rows(ucm_ptr, seg_ptr, offs, mask, M, scale):
    """Row stabilisers x_r (m_r - b_r) and read weights read_r = scale * exp(M_c - x_r) of the chunk-start state for
    the rows at `offs`, and their segment index (0 without documents; masked rows: x = M, seg = 0)."""
    ucm = tl.load(ucm_ptr + offs, mask=mask, other=float("-inf"))
    if seg_ptr is not None:
        seg = tl.load(seg_ptr + offs, mask=mask, other=0)
        fresh = seg > 0  # past a start in this chunk: the empty state, whose stabiliser is 0
        x = tl.maximum(tl.where(fresh, 0.0, M), ucm)
        read = scale * tl.exp(tl.where(fresh, float("-inf"), M - x))  # masked before exp: M - x may be > 0 there
    else:
        seg = tl.zeros_like(offs)
        x = tl.maximum(M, ucm)
        read = scale * tl.exp(M - x)
    return x, read, seg


@triton.jit
def _chunk_end(ucm_ptr, seg_ptr, last, M):
    """x_{L-1}, the carry exp(M_c - x_{L-1}) of the chunk-start state into the chunk-end state, and the last row's
    segment: a chunk holding a start carries nothing (its last segment began from the empty state)."""
    ucm_last = tl.load(ucm_ptr + last)
    if seg_ptr is not None:
        seg_last = tl.load(seg_ptr + last)
        x_last = tl.maximum(tl.where(seg_last > 0, 0.0, M), ucm_last)
        carry = tl.exp(tl.where(seg_last > 0, float("-inf"), M - x_last))
    else:
        seg_last = 0
        x_last = tl.maximum(M, ucm_last)
        carry = tl.exp(M - x_last)
    return x_last, carry, seg_last


@triton.jit
def _write_u(u, seg_ptr, offs, mask, seg_last):
    """u_j of the sources at `offs`, -inf for those before the chunk's last segment (they miss the chunk-end state)."""
    if seg_ptr is not None:
        seg = tl.load(seg_ptr + offs, mask=mask, other=-1)
        u = tl.where(seg == seg_last, u, float("-inf"))
    return u


@triton.jit
def mlstm_fwd_states_kernel(
    k_ptr,
    v_ptr,
    u_ptr,
    ucm_ptr,
    b_ptr,
    seg_ptr,  # (BH, Sp) int32 segment index, or None (no documents)
    C0_ptr,  # (BH, DQK, DV) fp32
    n0_ptr,  # (BH, DQK)
    m0_ptr,  # (BH,)
    Cs_ptr,  # (BH, NCB, DQK, DV) out: state before each chunk C_FIRST <= c < C_END, at c - C_FIRST
    ns_ptr,  # (BH, NCB, DQK)
    Ms_ptr,  # (BH, NC + 1): M_c before chunk c, M_NC after the last one
    Cf_ptr,  # (BH, DQK, DV) out: state after chunk C_END - 1
    nf_ptr,  # (BH, DQK)
    S,
    NC,
    C_FIRST,
    C_END,
    NCB,
    L: tl.constexpr,
    DQK: tl.constexpr,
    DV: tl.constexpr,
    BL: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    DT: tl.constexpr,
    IEEE: tl.constexpr,
):
    """Grid (cdiv(DQK, BK), cdiv(DV, BV), BH): one (BK, BV) tile of C, scanned over chunks C_FIRST <= c < C_END in
    fp32 from the state (C0, n0, m0) before chunk C_FIRST (the caller scans long sequences in segments, so that the
    states of only NCB chunks exist at once)."""
    pid_k, pid_v, bh = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    ok = pid_k * BK + tl.arange(0, BK)
    ov = pid_v * BV + tl.arange(0, BV)
    mk, mv = ok < DQK, ov < DV
    mkv = mk[:, None] & mv[None, :]
    c_off = ok[:, None] * DV + ov[None, :]
    first_v = pid_v == 0  # n and M are written by one program per head only
    first = first_v & (pid_k == 0)

    C = tl.load(C0_ptr + bh * DQK * DV + c_off, mask=mkv, other=0.0)
    n = tl.load(n0_ptr + bh * DQK + ok, mask=mk, other=0.0)
    M = tl.load(m0_ptr + bh)
    k_base = k_ptr + bh * S * DQK
    v_base = v_ptr + bh * S * DV
    g_base = bh * NC * L
    for c in range(C_FIRST, C_END):
        tl.store(Cs_ptr + (bh * NCB + c - C_FIRST) * DQK * DV + c_off, C, mask=mkv)
        if first_v:
            tl.store(ns_ptr + (bh * NCB + c - C_FIRST) * DQK + ok, n, mask=mk)
        if first:
            tl.store(Ms_ptr + bh * (NC + 1) + c, M)
        c0 = c * L
        x_last, carry, seg_last = _chunk_end(ucm_ptr, seg_ptr, g_base + c0 + L - 1, M)
        b_last = tl.load(b_ptr + g_base + c0 + L - 1)
        C = C * carry
        n = n * carry
        for l0 in range(0, L, BL):
            r = l0 + tl.arange(0, BL)
            mr = r < L
            pos = c0 + r
            ms = mr & (pos < S)
            u = tl.load(u_ptr + g_base + pos, mask=mr, other=float("-inf"))
            w = tl.exp(_write_u(u, seg_ptr, g_base + pos, mr, seg_last) - x_last)
            kt = tl.load(k_base + pos[None, :] * DQK + ok[:, None], mask=mk[:, None] & ms[None, :], other=0.0)
            vt = tl.load(v_base + pos[:, None] * DV + ov[None, :], mask=ms[:, None] & mv[None, :], other=0.0)
            kw = kt.to(tl.float32) * w[None, :]
            C += _dot(kw, vt, DT, IEEE)
            n += tl.sum(kw, axis=1)
        M = b_last + x_last
    tl.store(Cf_ptr + bh * DQK * DV + c_off, C, mask=mkv)
    if first_v:
        tl.store(nf_ptr + bh * DQK + ok, n, mask=mk)
    if first:
        tl.store(Ms_ptr + bh * (NC + 1) + C_END, M)


@triton.jit
def mlstm_fwd_out_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    u_ptr,
    ucm_ptr,
    b_ptr,
    seg_ptr,
    Cs_ptr,
    ns_ptr,
    Ms_ptr,
    h_ptr,  # (BH, S, DV) out, input dtype
    den_ptr,  # (BH, Sp) out: q.n per row (before abs / max)
    m_ptr,  # (BH, Sp) out: row stabiliser
    S,
    NC,
    C_FIRST,  # chunk of the first row block; Cs, ns hold the states of chunks C_FIRST ... C_FIRST + NCB - 1
    NCB,
    scale,
    eps,
    L: tl.constexpr,
    DQK: tl.constexpr,
    DV: tl.constexpr,
    BL: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    DT: tl.constexpr,
    IEEE: tl.constexpr,
):
    """Grid (chunks * cdiv(L, BL), cdiv(DV, BV), BH): BL rows of one chunk, one DV tile of h; the q k^T block is
    recomputed per DV tile (reduced over all of DQK in BK steps)."""
    NB = (L + BL - 1) // BL  # row blocks per chunk (constexpr)
    pid_cb, pid_v, bh = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    c, ib = C_FIRST + pid_cb // NB, pid_cb % NB
    r = ib * BL + tl.arange(0, BL)
    mr = r < L
    pos = c * L + r
    ms = mr & (pos < S)
    ov = pid_v * BV + tl.arange(0, BV)
    mv = ov < DV
    g_base = bh * NC * L
    q_base, k_base, v_base = q_ptr + bh * S * DQK, k_ptr + bh * S * DQK, v_ptr + bh * S * DV
    st = bh * NCB + c - C_FIRST

    M = tl.load(Ms_ptr + bh * (NC + 1) + c)
    x, read, seg = _rows(ucm_ptr, seg_ptr, g_base + pos, mr, M, scale)

    # inter-chunk: the state before the chunk
    acc = tl.zeros((BL, BV), dtype=tl.float32)
    den = tl.zeros((BL,), dtype=tl.float32)
    for k0 in range(0, DQK, BK):
        ok = k0 + tl.arange(0, BK)
        mk = ok < DQK
        qt = tl.load(q_base + pos[:, None] * DQK + ok[None, :], mask=ms[:, None] & mk[None, :], other=0.0)
        Ct = tl.load(Cs_ptr + st * DQK * DV + ok[:, None] * DV + ov[None, :], mask=mk[:, None] & mv[None, :], other=0.0)
        nt = tl.load(ns_ptr + st * DQK + ok, mask=mk, other=0.0)
        acc += _dot(qt, Ct, DT, IEEE)
        den += tl.sum(qt.to(tl.float32) * nt[None, :], axis=1)
    acc = acc * read[:, None]
    den = den * read

    # intra-chunk: causal blocks up to the diagonal
    for jb in range(0, ib + 1):
        j = jb * BL + tl.arange(0, BL)
        mj = j < L
        posj = c * L + j
        msj = mj & (posj < S)
        uj = tl.load(u_ptr + g_base + posj, mask=mj, other=float("-inf"))
        s = tl.zeros((BL, BL), dtype=tl.float32)
        for k0 in range(0, DQK, BK):
            ok = k0 + tl.arange(0, BK)
            mk = ok < DQK
            qt = tl.load(q_base + pos[:, None] * DQK + ok[None, :], mask=ms[:, None] & mk[None, :], other=0.0)
            kt = tl.load(k_base + posj[None, :] * DQK + ok[:, None], mask=mk[:, None] & msj[None, :], other=0.0)
            s += _dot(qt, kt, DT, IEEE)
        keep = (j[None, :] <= r[:, None]) & mr[:, None]  # rows past the chunk have x = M_c: exp could overflow
        if seg_ptr is not None:
            segj = tl.load(seg_ptr + g_base + posj, mask=mj, other=-1)
            keep = keep & (segj[None, :] == seg[:, None])  # no weight across a document start
        log_d = tl.where(keep, uj[None, :] - x[:, None], float("-inf"))
        s = s * (scale * tl.exp(log_d))
        den += tl.sum(s, axis=1)
        vt = tl.load(v_base + posj[:, None] * DV + ov[None, :], mask=msj[:, None] & mv[None, :], other=0.0)
        acc += _dot(s, vt, DT, IEEE)

    m = tl.load(b_ptr + g_base + pos, mask=mr, other=0.0) + x
    floor = tl.exp(tl.minimum(-m, FLOOR_MAX_EXPONENT))
    h = acc / (tl.maximum(tl.abs(den), floor) + eps)[:, None]
    h_off = pos[:, None] * DV + ov[None, :]
    tl.store(h_ptr + bh * S * DV + h_off, h.to(h_ptr.dtype.element_ty), mask=ms[:, None] & mv[None, :])
    if pid_v == 0:  # one program per row block writes the row statistics
        tl.store(den_ptr + g_base + pos, den, mask=mr)
        tl.store(m_ptr + g_base + pos, m, mask=mr)
