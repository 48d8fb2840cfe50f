"""Triton backward kernels of the chunkwise mLSTM: a reverse scan for the state gradients, then dq, dk, dv per chunk.

Layout and gate vectors as in kernels_forward.py. All stabilisers are constants here; the normaliser enters as
dnum = dh / norm (norm = max(|q.n|, exp(-m)) + eps per row) and, for the exact semantics only, as dden, the gradient
w.r.t. the denominator row q.n (which then also sends gradient into n). With D_ij = scale * exp(u_j - x_i) (j <= i):
  dS_ij = (dnum_i . v_j + dden_i) D_ij,  S_ij = (q_i . k_j) D_ij
  dq_i = sum_j dS_ij k_j + read_i (C_c dnum_i + dden_i n_c)        read_i  = scale * exp(M_c - x_i)
  dk_j = sum_i dS_ij q_i + write_j (dC_c v_j + dn_c)                write_j = exp(u_j - x_{L-1})
  dv_j = sum_i S_ij dnum_i + write_j dC_c^T k_j
where C_c, n_c are the states before chunk c and dC_c, dn_c the gradients w.r.t. the state after chunk c.
Packed documents (`seg_ptr`, see kernels_forward.py): D_ij, read_i, write_j and the carry get the forward's masks, so
the reverse scan stops at a chunk holding a start and no gradient crosses a start inside a chunk.
The dq and dk kernels also write per-row partial sums of q.dq and k.dk (one slice per DQK tile) for the gate gradients.
"""

import triton
import triton.language as tl

from xlstm_megatron.ops.mlstm.triton.kernels_forward import _chunk_end, _dot, _rows, _write_u


@triton.jit
def _load_dnum(dh_base, norm_base, pos, ms, ov, mv, DV: tl.constexpr):
    """(BL, BV) fp32 tile of dh / norm for the rows at positions pos (norm_base: this head's norm vector)."""
    dh = tl.load(dh_base + pos[:, None] * DV + ov[None, :], mask=ms[:, None] & mv[None, :], other=0.0)
    norm = tl.load(norm_base + pos, mask=ms, other=1.0)
    return dh.to(tl.float32) / norm[:, None]


@triton.jit
def mlstm_bwd_states_kernel(
    q_ptr,
    dh_ptr,
    ucm_ptr,
    seg_ptr,  # (BH, Sp) int32 segment index, or None (no documents)
    norm_ptr,
    dden_ptr,
    Ms_ptr,
    dCf_ptr,  # (BH, DQK, DV) gradient w.r.t. the final C (read if HAS_DCF)
    dnf_ptr,  # (BH, DQK) gradient w.r.t. the final n (read if HAS_DNF)
    dCs_ptr,  # (BH, NC, DQK, DV) out: gradient w.r.t. the state after each chunk
    dns_ptr,  # (BH, NC, DQK) out (if HAS_N)
    dC0_ptr,  # (BH, DQK, DV) out: gradient w.r.t. the initial state
    dn0_ptr,  # (BH, DQK) out (if HAS_N)
    S,
    NC,
    scale,
    L: tl.constexpr,
    DQK: tl.constexpr,
    DV: tl.constexpr,
    BL: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    DT: tl.constexpr,
    IEEE: tl.constexpr,
    HAS_DCF: tl.constexpr,
    HAS_DNF: tl.constexpr,
    HAS_DDEN: tl.constexpr,
):
    """Grid (cdiv(DQK, BK), cdiv(DV, BV), BH): reverse scan dC_{c-1} = carry_c dC_c + sum_i read_i q_i dnum_i^T."""
    pid_k, pid_v, bh = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    ok = pid_k * BK + tl.arange(0, BK)
    ov = pid_v * BV + tl.arange(0, BV)
    mk, mv = ok < DQK, ov < DV
    mkv = mk[:, None] & mv[None, :]
    c_off = ok[:, None] * DV + ov[None, :]
    first_v = pid_v == 0
    q_base, dh_base = q_ptr + bh * S * DQK, dh_ptr + bh * S * DV
    g_base = bh * NC * L

    dC = tl.zeros((BK, BV), dtype=tl.float32)
    dn = tl.zeros((BK,), dtype=tl.float32)
    if HAS_DCF:
        dC += tl.load(dCf_ptr + bh * DQK * DV + c_off, mask=mkv, other=0.0)
    if HAS_DNF:
        dn += tl.load(dnf_ptr + bh * DQK + ok, mask=mk, other=0.0)
    for cc in range(NC):
        c = NC - 1 - cc
        tl.store(dCs_ptr + (bh * NC + c) * DQK * DV + c_off, dC, mask=mkv)
        if HAS_DNF or HAS_DDEN:  # noqa: SIM102 - compile-time branch around a run-time one
            if first_v:
                tl.store(dns_ptr + (bh * NC + c) * DQK + ok, dn, mask=mk)
        M = tl.load(Ms_ptr + bh * (NC + 1) + c)
        x_last, carry, seg_last = _chunk_end(ucm_ptr, seg_ptr, g_base + c * L + L - 1, M)
        dC = dC * carry
        dn = dn * carry
        for l0 in range(0, L, BL):
            r = l0 + tl.arange(0, BL)
            mr = r < L
            pos = c * L + r
            ms = mr & (pos < S)
            x, read, seg = _rows(ucm_ptr, seg_ptr, g_base + pos, mr, M, scale)
            qt = tl.load(q_base + pos[None, :] * DQK + ok[:, None], mask=mk[:, None] & ms[None, :], other=0.0)
            qr = qt.to(tl.float32) * read[None, :]
            dnum = _load_dnum(dh_base, norm_ptr + g_base, pos, ms, ov, mv, DV)
            dC += _dot(qr, dnum, DT, IEEE)
            if HAS_DDEN:
                dden = tl.load(dden_ptr + g_base + pos, mask=ms, other=0.0)
                dn += tl.sum(qr * dden[None, :], axis=1)
    tl.store(dC0_ptr + bh * DQK * DV + c_off, dC, mask=mkv)
    if HAS_DNF or HAS_DDEN:  # noqa: SIM102 - compile-time branch around a run-time one
        if first_v:
            tl.store(dn0_ptr + bh * DQK + ok, dn, mask=mk)


@triton.jit
def mlstm_bwd_dq_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    dh_ptr,
    u_ptr,
    ucm_ptr,
    seg_ptr,
    norm_ptr,
    dden_ptr,
    Cs_ptr,
    ns_ptr,
    Ms_ptr,
    dq_ptr,  # (BH, S, DQK) out
    qdq_ptr,  # (>= cdiv(DQK, BK), BH, Sp) fp32 out: partial row sums of q * dq per DQK tile
    S,
    NC,
    scale,
    L: tl.constexpr,
    DQK: tl.constexpr,
    DV: tl.constexpr,
    BL: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    DT: tl.constexpr,
    IEEE: tl.constexpr,
    HAS_DDEN: tl.constexpr,
):
    """Grid (NC * cdiv(L, BL), cdiv(DQK, BK), BH): BL query rows of one chunk, one DQK tile of dq."""
    NB = (L + BL - 1) // BL  # row blocks per chunk (constexpr)
    pid_cb, pid_k, bh = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    c, ib = pid_cb // NB, pid_cb % NB
    r = ib * BL + tl.arange(0, BL)
    mr = r < L
    pos = c * L + r
    ms = mr & (pos < S)
    ok = pid_k * BK + tl.arange(0, BK)
    mk = ok < DQK
    g_base = bh * NC * L
    q_base, k_base = q_ptr + bh * S * DQK, k_ptr + bh * S * DQK
    v_base, dh_base = v_ptr + bh * S * DV, dh_ptr + bh * S * DV
    st = bh * NC + c

    M = tl.load(Ms_ptr + bh * (NC + 1) + c)
    x, read, seg = _rows(ucm_ptr, seg_ptr, g_base + pos, mr, M, scale)
    dden = tl.zeros((BL,), dtype=tl.float32)
    if HAS_DDEN:
        dden += tl.load(dden_ptr + g_base + pos, mask=ms, other=0.0)

    acc = tl.zeros((BL, BK), dtype=tl.float32)
    for v0 in range(0, DV, BV):
        ov = v0 + tl.arange(0, BV)
        mv = ov < DV
        dnum = _load_dnum(dh_base, norm_ptr + g_base, pos, ms, ov, mv, DV)
        Ct = tl.load(Cs_ptr + st * DQK * DV + ok[None, :] * DV + ov[:, None], mask=mk[None, :] & mv[:, None], other=0.0)
        acc += _dot(dnum, Ct, DT, IEEE)
    if HAS_DDEN:
        nt = tl.load(ns_ptr + st * DQK + ok, mask=mk, other=0.0)
        acc += dden[:, None] * nt[None, :]
    acc = acc * read[:, None]

    for jb in range(0, ib + 1):
        j = jb * BL + tl.arange(0, BL)
        mj = j < L
        posj = c * L + j
        msj = mj & (posj < S)
        uj = tl.load(u_ptr + g_base + posj, mask=mj, other=float("-inf"))
        ds = tl.zeros((BL, BL), dtype=tl.float32)
        for v0 in range(0, DV, BV):
            ov = v0 + tl.arange(0, BV)
            mv = ov < DV
            dnum = _load_dnum(dh_base, norm_ptr + g_base, pos, ms, ov, mv, DV)
            vt = tl.load(v_base + posj[None, :] * DV + ov[:, None], mask=mv[:, None] & msj[None, :], other=0.0)
            ds += _dot(dnum, vt, DT, IEEE)
        if HAS_DDEN:
            ds += dden[:, None]
        keep = (j[None, :] <= r[:, None]) & mr[:, None]  # rows past the chunk have x = M_c: exp could overflow
        if seg_ptr is not None:
            segj = tl.load(seg_ptr + g_base + posj, mask=mj, other=-1)
            keep = keep & (segj[None, :] == seg[:, None])
        log_d = tl.where(keep, uj[None, :] - x[:, None], float("-inf"))
        ds = ds * (scale * tl.exp(log_d))
        kt = tl.load(k_base + posj[:, None] * DQK + ok[None, :], mask=msj[:, None] & mk[None, :], other=0.0)
        acc += _dot(ds, kt, DT, IEEE)

    qt = tl.load(q_base + pos[:, None] * DQK + ok[None, :], mask=ms[:, None] & mk[None, :], other=0.0)
    tl.store(dq_ptr + bh * S * DQK + pos[:, None] * DQK + ok[None, :], acc.to(dq_ptr.dtype.element_ty),
             mask=ms[:, None] & mk[None, :])
    BH = tl.num_programs(2)
    tl.store(qdq_ptr + (pid_k * BH + bh) * NC * L + pos, tl.sum(qt.to(tl.float32) * acc, axis=1), mask=ms)


@triton.jit
def mlstm_bwd_dk_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    dh_ptr,
    u_ptr,
    ucm_ptr,
    seg_ptr,
    norm_ptr,
    dden_ptr,
    dCs_ptr,
    dns_ptr,
    Ms_ptr,
    dk_ptr,  # (BH, S, DQK) out
    kdk_ptr,  # (>= cdiv(DQK, BK), BH, Sp) fp32 out: partial row sums of k * dk per DQK tile
    S,
    NC,
    scale,
    L: tl.constexpr,
    DQK: tl.constexpr,
    DV: tl.constexpr,
    BL: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    DT: tl.constexpr,
    IEEE: tl.constexpr,
    HAS_N: tl.constexpr,
    HAS_DDEN: tl.constexpr,
):
    """Grid (NC * cdiv(L, BL), cdiv(DQK, BK), BH): BL key rows of one chunk, one DQK tile of dk."""
    NB = (L + BL - 1) // BL  # row blocks per chunk (constexpr)
    pid_cb, pid_k, bh = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    c, jb = pid_cb // NB, pid_cb % NB
    j = jb * BL + tl.arange(0, BL)
    mj = j < L
    posj = c * L + j
    msj = mj & (posj < S)
    ok = pid_k * BK + tl.arange(0, BK)
    mk = ok < DQK
    g_base = bh * NC * L
    q_base, k_base = q_ptr + bh * S * DQK, k_ptr + bh * S * DQK
    v_base, dh_base = v_ptr + bh * S * DV, dh_ptr + bh * S * DV
    st = bh * NC + c
    dC_base = dCs_ptr + st * DQK * DV

    M = tl.load(Ms_ptr + bh * (NC + 1) + c)
    x_last, carry, seg_last = _chunk_end(ucm_ptr, seg_ptr, g_base + c * L + L - 1, M)
    uj = tl.load(u_ptr + g_base + posj, mask=mj, other=float("-inf"))
    write = tl.exp(_write_u(uj, seg_ptr, g_base + posj, mj, seg_last) - x_last)
    if seg_ptr is not None:
        segj = tl.load(seg_ptr + g_base + posj, mask=mj, other=-1)

    acc = tl.zeros((BL, BK), dtype=tl.float32)
    for v0 in range(0, DV, BV):
        ov = v0 + tl.arange(0, BV)
        mv = ov < DV
        vt = tl.load(v_base + posj[:, None] * DV + ov[None, :], mask=msj[:, None] & mv[None, :], other=0.0)
        dCt = tl.load(dC_base + ok[None, :] * DV + ov[:, None], mask=mk[None, :] & mv[:, None], other=0.0)
        acc += _dot(vt, dCt, DT, IEEE)
    if HAS_N:
        acc += tl.load(dns_ptr + st * DQK + ok, mask=mk, other=0.0)[None, :]
    acc = acc * write[:, None]

    for ib in range(jb, NB):
        r = ib * BL + tl.arange(0, BL)
        mr = r < L
        pos = c * L + r
        ms = mr & (pos < S)
        x, read, seg = _rows(ucm_ptr, seg_ptr, g_base + pos, mr, M, scale)
        ds_t = tl.zeros((BL, BL), dtype=tl.float32)  # (key j, query i)
        for v0 in range(0, DV, BV):
            ov = v0 + tl.arange(0, BV)
            mv = ov < DV
            vt = tl.load(v_base + posj[:, None] * DV + ov[None, :], mask=msj[:, None] & mv[None, :], other=0.0)
            dh_t = tl.load(dh_base + pos[None, :] * DV + ov[:, None], mask=mv[:, None] & ms[None, :], other=0.0)
            ds_t += _dot(vt, dh_t, DT, IEEE)
        norm = tl.load(norm_ptr + g_base + pos, mask=ms, other=1.0)
        ds_t = ds_t / norm[None, :]
        if HAS_DDEN:
            ds_t += tl.load(dden_ptr + g_base + pos, mask=ms, other=0.0)[None, :]
        # rows past the chunk (r >= L, when BL does not divide L) are summed over here: their x = M_c can lie far
        # below u_j, so exp would give inf and 0 * inf = nan in the dot
        keep = (j[:, None] <= r[None, :]) & mr[None, :]
        if seg_ptr is not None:
            keep = keep & (segj[:, None] == seg[None, :])
        log_d = tl.where(keep, uj[:, None] - x[None, :], float("-inf"))
        ds_t = ds_t * (scale * tl.exp(log_d))
        qt = tl.load(q_base + pos[:, None] * DQK + ok[None, :], mask=ms[:, None] & mk[None, :], other=0.0)
        acc += _dot(ds_t, qt, DT, IEEE)

    kt = tl.load(k_base + posj[:, None] * DQK + ok[None, :], mask=msj[:, None] & mk[None, :], other=0.0)
    tl.store(dk_ptr + bh * S * DQK + posj[:, None] * DQK + ok[None, :], acc.to(dk_ptr.dtype.element_ty),
             mask=msj[:, None] & mk[None, :])
    BH = tl.num_programs(2)
    tl.store(kdk_ptr + (pid_k * BH + bh) * NC * L + posj, tl.sum(kt.to(tl.float32) * acc, axis=1), mask=msj)


@triton.jit
def mlstm_bwd_dv_kernel(
    q_ptr,
    k_ptr,
    dh_ptr,
    u_ptr,
    ucm_ptr,
    seg_ptr,
    norm_ptr,
    dCs_ptr,
    Ms_ptr,
    dv_ptr,  # (BH, S, DV) out
    S,
    NC,
    scale,
    L: tl.constexpr,
    DQK: tl.constexpr,
    DV: tl.constexpr,
    BL: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    DT: tl.constexpr,
    IEEE: tl.constexpr,
):
    """Grid (NC * cdiv(L, BL), cdiv(DV, BV), BH): BL key rows of one chunk, one DV tile of dv."""
    NB = (L + BL - 1) // BL  # row blocks per chunk (constexpr)
    pid_cb, pid_v, bh = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    c, jb = pid_cb // NB, pid_cb % NB
    j = jb * BL + tl.arange(0, BL)
    mj = j < L
    posj = c * L + j
    msj = mj & (posj < S)
    ov = pid_v * BV + tl.arange(0, BV)
    mv = ov < DV
    g_base = bh * NC * L
    q_base, k_base, dh_base = q_ptr + bh * S * DQK, k_ptr + bh * S * DQK, dh_ptr + bh * S * DV
    st = bh * NC + c
    dC_base = dCs_ptr + st * DQK * DV

    M = tl.load(Ms_ptr + bh * (NC + 1) + c)
    x_last, carry, seg_last = _chunk_end(ucm_ptr, seg_ptr, g_base + c * L + L - 1, M)
    uj = tl.load(u_ptr + g_base + posj, mask=mj, other=float("-inf"))
    write = tl.exp(_write_u(uj, seg_ptr, g_base + posj, mj, seg_last) - x_last)
    if seg_ptr is not None:
        segj = tl.load(seg_ptr + g_base + posj, mask=mj, other=-1)

    acc = tl.zeros((BL, BV), dtype=tl.float32)
    for k0 in range(0, DQK, BK):
        ok = k0 + tl.arange(0, BK)
        mk = ok < DQK
        kt = tl.load(k_base + posj[:, None] * DQK + ok[None, :], mask=msj[:, None] & mk[None, :], other=0.0)
        dCt = tl.load(dC_base + ok[:, None] * DV + ov[None, :], mask=mk[:, None] & mv[None, :], other=0.0)
        acc += _dot(kt, dCt, DT, IEEE)
    acc = acc * write[:, None]

    for ib in range(jb, NB):
        r = ib * BL + tl.arange(0, BL)
        mr = r < L
        pos = c * L + r
        ms = mr & (pos < S)
        x, read, seg = _rows(ucm_ptr, seg_ptr, g_base + pos, mr, M, scale)
        s_t = tl.zeros((BL, BL), dtype=tl.float32)  # (key j, query i)
        for k0 in range(0, DQK, BK):
            ok = k0 + tl.arange(0, BK)
            mk = ok < DQK
            kt = tl.load(k_base + posj[:, None] * DQK + ok[None, :], mask=msj[:, None] & mk[None, :], other=0.0)
            qt = tl.load(q_base + pos[None, :] * DQK + ok[:, None], mask=mk[:, None] & ms[None, :], other=0.0)
            s_t += _dot(kt, qt, DT, IEEE)
        # rows past the chunk (r >= L, when BL does not divide L) are summed over here: their x = M_c can lie far
        # below u_j, so exp would give inf and 0 * inf = nan in the dot
        keep = (j[:, None] <= r[None, :]) & mr[None, :]
        if seg_ptr is not None:
            keep = keep & (segj[:, None] == seg[None, :])
        log_d = tl.where(keep, uj[:, None] - x[None, :], float("-inf"))
        s_t = s_t * (scale * tl.exp(log_d))
        dnum = _load_dnum(dh_base, norm_ptr + g_base, pos, ms, ov, mv, DV)
        acc += _dot(s_t, dnum, DT, IEEE)

    tl.store(dv_ptr + bh * S * DV + posj[:, None] * DV + ov[None, :], acc.to(dv_ptr.dtype.element_ty),
             mask=msj[:, None] & mv[None, :])
