"""Triton kernels of the sLSTM: the time loop inside the kernel, R streamed from global memory (L2) every step.

Layouts (all contiguous): wx / raw / g_wx (B, S, NH, 4, DH) with gates (i, f, z, o); r (NH, DH_in, 4, DH_out);
bias (NH, 4, DH); per-step states ys / cs / ns / ms (B, S + 1, NH, DH) fp32, index 0 holding the initial state
(written by the caller). The head size DH is a run-time value: every tile is (BB batch rows) x (BK or BN head
columns), masked, so shared memory and registers do not grow with DH and no head is padded to a power of two.

Work split: the grid is (P, NH, batch tiles). The P programs of one (head, batch tile) own the head's column blocks
cb = p, p + P, ...: for those columns a program forms all four gate pre-activations (y_{t-1} R needs the whole
y_{t-1}, read back from ys), the new state (elementwise per column, so no other program is involved) and stores it.
Before the next step every program of the group must have stored its columns:
- SYNC: a grid barrier per step (an atomic counter per group in global memory). All P programs must be resident at
  once: the launcher checks the occupancy and launches cooperatively.
- not SYNC with P == 1: one program does every column block; a CTA barrier per step orders its own stores and loads.
- not SYNC with P > 1: the caller launches one step per kernel (T1 = T0 + 1); the launch boundary is the barrier.
  (Also how the interpreter, which runs programs one after another, tests the split.)
Values written by other programs are read with `.cg` loads (L2, not a possibly stale L1 line); the SYNC variant is
compiled without software pipelining, whose asynchronous copies would go through L1 (see launch.py).

All math is fp32 with IEEE dots (the torch path's fp32 semantics). `first_zero_ptr` holds all(n0 == 0) over the
whole initial state: the official "m = ĩ" branch, possible at t = 0 only.

Packed documents (DOCS): `starts_ptr` (B, S) fp32, nonzero at each document's first token. At such a (row, step) the
previous y, c, n, m read as 0 (y also in y_{t-1} R) and m_new = ĩ, i.e. the row's own fresh start; the saved
history keeps the true previous state, so the backward applies the same reads. Without DOCS nothing is loaded.
"""

import triton
import triton.language as tl


@triton.jit
def _dot(a, b):
    return tl.dot(a, b, input_precision="ieee")


@triton.jit
def _log_forget(f_raw, EXP_FORGET: tl.constexpr):
    """log f = f̃ (exp) or log σ(f̃) = min(f̃, 0) - log1p(exp(-|f̃|)) (sigmoid, stable for any f̃)."""
    if EXP_FORGET:
        return f_raw
    else:
        return tl.minimum(f_raw, 0.0) - tl.log(1.0 + tl.exp(-tl.abs(f_raw)))


@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _tanh(x):
    # 1 - 2 / (exp(2x) + 1): exact limits +-1 for large |x| (no inf / inf)
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit
def _min_one_grad(x):
    """d exp(min(x, 0)) / dx with autograd's tie convention for torch.minimum (half the gradient at x == 0)."""
    return tl.where(x < 0.0, tl.exp(x), tl.where(x == 0.0, 0.5, 0.0))


@triton.jit
def _end_of_step(bar_ptr, target, SYNC: tl.constexpr):
    """Every store of this step is visible to the programs that read it in the next step.

    SYNC: grid barrier of the group; the counter only grows, so `target` = (steps done) * P needs no reset.
    """
    tl.debug_barrier()  # all threads of this program have issued their stores
    if SYNC:
        tl.atomic_add(bar_ptr, 1, sem="release", scope="gpu")
        seen = tl.atomic_add(bar_ptr, 0, sem="acquire", scope="gpu")
        while seen < target:
            seen = tl.atomic_add(bar_ptr, 0, sem="acquire", scope="gpu")
        tl.debug_barrier()  # no thread reads before the acquire above


@triton.jit
def _doc_start(starts_ptr, rows, rmask, S, t):
    """(BB,) bool: the rows that start a document at step t (false for padded rows and t >= S)."""
    return tl.load(starts_ptr + rows * S + t, mask=rmask & (t < S), other=0.0) != 0.0


@triton.jit
def slstm_fwd_kernel(
    wx_ptr, r_ptr, bias_ptr, first_zero_ptr, bar_ptr, starts_ptr,
    raw_ptr, ys_ptr, cs_ptr, ns_ptr, ms_ptr,
    B, S, NH, DH, T0, T1,
    BB: tl.constexpr, BK: tl.constexpr, BN: tl.constexpr, EXP_FORGET: tl.constexpr, SYNC: tl.constexpr,
    DOCS: tl.constexpr,
):
    """Steps T0 <= t < T1: raw gates of step t, then the state after it (ys / cs / ns / ms index t + 1)."""
    pid_p = tl.program_id(0)
    h = tl.program_id(1)
    pid_b = tl.program_id(2)
    P = tl.num_programs(0)
    rows = pid_b.to(tl.int64) * BB + tl.arange(0, BB)
    rmask = rows < B
    ncb = tl.cdiv(DH, BN)
    first_zero = tl.load(first_zero_ptr) != 0
    r_head = r_ptr + h.to(tl.int64) * DH * 4 * DH
    st_row = rows[:, None] * (S + 1) * NH * DH + h * DH  # (B, S + 1, NH, DH) at step 0, column 0
    gate_row = rows[:, None] * S * NH * 4 * DH + h * 4 * DH  # (B, S, NH, 4, DH) at step 0, gate i, column 0
    bar = bar_ptr + pid_b * NH + h
    for t in range(T0, T1):
        t64 = tl.cast(t, tl.int64)
        y_prev = st_row + t64 * NH * DH
        if DOCS:
            fresh = _doc_start(starts_ptr, rows, rmask, S, t64)
            y_rows = rmask & (fresh == 0)  # rows whose y_{t-1} enters y_{t-1} R
        else:
            y_rows = rmask
        for cb in range(pid_p, ncb, P):
            cols = cb * BN + tl.arange(0, BN)
            cmask = cols < DH
            mask = rmask[:, None] & cmask[None, :]
            acc_i = tl.zeros((BB, BN), dtype=tl.float32)
            acc_f = tl.zeros((BB, BN), dtype=tl.float32)
            acc_z = tl.zeros((BB, BN), dtype=tl.float32)
            acc_o = tl.zeros((BB, BN), dtype=tl.float32)
            for k0 in range(0, DH, BK):
                ks = k0 + tl.arange(0, BK)
                kmask = ks < DH
                y = tl.load(ys_ptr + y_prev + ks[None, :], mask=y_rows[:, None] & kmask[None, :], other=0.0,
                            cache_modifier=".cg")
                r_off = ks[:, None] * (4 * DH) + cols[None, :]
                r_mask = kmask[:, None] & cmask[None, :]
                acc_i += _dot(y, tl.load(r_head + r_off, mask=r_mask, other=0.0).to(tl.float32))
                acc_f += _dot(y, tl.load(r_head + r_off + DH, mask=r_mask, other=0.0).to(tl.float32))
                acc_z += _dot(y, tl.load(r_head + r_off + 2 * DH, mask=r_mask, other=0.0).to(tl.float32))
                acc_o += _dot(y, tl.load(r_head + r_off + 3 * DH, mask=r_mask, other=0.0).to(tl.float32))
            b_off = bias_ptr + h * 4 * DH + cols
            g_off = gate_row + t64 * NH * 4 * DH + cols[None, :]
            i_raw = acc_i + tl.load(wx_ptr + g_off, mask=mask, other=0.0).to(tl.float32) + \
                tl.load(b_off, mask=cmask, other=0.0).to(tl.float32)[None, :]
            f_raw = acc_f + tl.load(wx_ptr + g_off + DH, mask=mask, other=0.0).to(tl.float32) + \
                tl.load(b_off + DH, mask=cmask, other=0.0).to(tl.float32)[None, :]
            z_raw = acc_z + tl.load(wx_ptr + g_off + 2 * DH, mask=mask, other=0.0).to(tl.float32) + \
                tl.load(b_off + 2 * DH, mask=cmask, other=0.0).to(tl.float32)[None, :]
            o_raw = acc_o + tl.load(wx_ptr + g_off + 3 * DH, mask=mask, other=0.0).to(tl.float32) + \
                tl.load(b_off + 3 * DH, mask=cmask, other=0.0).to(tl.float32)[None, :]
            tl.store(raw_ptr + g_off, i_raw, mask=mask)
            tl.store(raw_ptr + g_off + DH, f_raw, mask=mask)
            tl.store(raw_ptr + g_off + 2 * DH, z_raw, mask=mask)
            tl.store(raw_ptr + g_off + 3 * DH, o_raw, mask=mask)

            s_prev = y_prev + cols[None, :]  # own columns: written by this program (or the caller at t = 0)
            c = tl.load(cs_ptr + s_prev, mask=mask, other=0.0)
            n = tl.load(ns_ptr + s_prev, mask=mask, other=1.0)
            m = tl.load(ms_ptr + s_prev, mask=mask, other=0.0)
            if DOCS:
                c = tl.where(fresh[:, None], 0.0, c)
                n = tl.where(fresh[:, None], 0.0, n)
                m = tl.where(fresh[:, None], 0.0, m)
            a = m + _log_forget(f_raw, EXP_FORGET)
            m_new = tl.where(first_zero & (t == 0), i_raw, tl.maximum(i_raw, a))
            if DOCS:
                m_new = tl.where(fresh[:, None], i_raw, m_new)
            i_gate = tl.exp(tl.minimum(i_raw - m_new, 0.0))
            f_gate = tl.exp(tl.minimum(a - m_new, 0.0))
            c = f_gate * c + i_gate * _tanh(z_raw)
            n = f_gate * n + i_gate
            s_new = s_prev + NH * DH
            tl.store(ys_ptr + s_new, _sigmoid(o_raw) * c / n, mask=mask)
            tl.store(cs_ptr + s_new, c, mask=mask)
            tl.store(ns_ptr + s_new, n, mask=mask)
            tl.store(ms_ptr + s_new, m_new, mask=mask)
        _end_of_step(bar, (t + 1 - T0) * P, SYNC)


@triton.jit
def slstm_bwd_kernel(
    r_ptr, raw_ptr, ys_ptr, cs_ptr, ns_ptr, ms_ptr, first_zero_ptr, bar_ptr, starts_ptr,
    gy_ptr, gy_last_ptr, gc_ptr, gn_ptr, gm_ptr, gwx_ptr,
    B, S, NH, DH, T0, T1,
    BB: tl.constexpr, BK: tl.constexpr, BN: tl.constexpr, EXP_FORGET: tl.constexpr, SYNC: tl.constexpr,
    DOCS: tl.constexpr,
):
    """Steps t = T1 - 1 down to T0. dL/d(c, n, m) of the state after step t are carried in gc / gn / gm (B, NH, DH),
    in place (the caller fills them with the final state's gradients; they end as the initial state's). dL/dy_t is
    the output gradient plus g_raw_{t+1} R^T (or dL/dy_S at the last step). Per step the kernel stores dL/d raw gates
    as g_wx (fp32). The gradients of R, the bias and y_0 are reductions of g_wx done by the caller (DOCS: with y_{t-1}
    read as 0 in rows starting at t, as here, where such rows get no gradient into step t - 1's state)."""
    pid_p = tl.program_id(0)
    h = tl.program_id(1)
    pid_b = tl.program_id(2)
    P = tl.num_programs(0)
    rows = pid_b.to(tl.int64) * BB + tl.arange(0, BB)
    rmask = rows < B
    ncb = tl.cdiv(DH, BN)
    first_zero = tl.load(first_zero_ptr) != 0
    r_head = r_ptr + h.to(tl.int64) * DH * 4 * DH
    st_row = rows[:, None] * (S + 1) * NH * DH + h * DH
    out_row = rows[:, None] * S * NH * DH + h * DH  # (B, S, NH, DH)
    gate_row = rows[:, None] * S * NH * 4 * DH + h * 4 * DH
    carry_row = rows[:, None] * NH * DH + h * DH  # (B, NH, DH)
    bar = bar_ptr + pid_b * NH + h
    for k in range(T0, T1):
        t = T1 - 1 - (k - T0)
        t64 = tl.cast(t, tl.int64)
        g_next = gate_row + (t64 + 1) * NH * 4 * DH  # g_wx of step t + 1 (all columns: every program's)
        k_end = tl.where(t + 1 < S, DH, 0)
        if DOCS:
            fresh = _doc_start(starts_ptr, rows, rmask, S, t64)
            # y_t reaches step t + 1 only in rows that do not restart there
            next_rows = rmask & (_doc_start(starts_ptr, rows, rmask, S, t64 + 1) == 0)
        else:
            next_rows = rmask
        for cb in range(pid_p, ncb, P):
            cols = cb * BN + tl.arange(0, BN)
            cmask = cols < DH
            mask = rmask[:, None] & cmask[None, :]
            acc = tl.zeros((BB, BN), dtype=tl.float32)
            for e0 in range(0, k_end, BK):
                es = e0 + tl.arange(0, BK)
                emask = es < DH
                g_mask = next_rows[:, None] & emask[None, :]
                rt_off = cols[None, :] * (4 * DH) + es[:, None]  # R[h, cols, g, es] as a (BK, BN) tile
                rt_mask = emask[:, None] & cmask[None, :]
                for g in tl.static_range(4):
                    g_raw = tl.load(gwx_ptr + g_next + g * DH + es[None, :], mask=g_mask, other=0.0,
                                    cache_modifier=".cg")
                    acc += _dot(g_raw, tl.load(r_head + rt_off + g * DH, mask=rt_mask, other=0.0).to(tl.float32))
            c_off = carry_row + cols[None, :]
            if t + 1 == S:
                acc += tl.load(gy_last_ptr + c_off, mask=mask, other=0.0)
            g_y = acc + tl.load(gy_ptr + out_row + t64 * NH * DH + cols[None, :], mask=mask, other=0.0)
            g_c = tl.load(gc_ptr + c_off, mask=mask, other=0.0)
            g_n = tl.load(gn_ptr + c_off, mask=mask, other=0.0)
            g_m = tl.load(gm_ptr + c_off, mask=mask, other=0.0)

            g_off = gate_row + t64 * NH * 4 * DH + cols[None, :]
            i_raw = tl.load(raw_ptr + g_off, mask=mask, other=0.0)
            f_raw = tl.load(raw_ptr + g_off + DH, mask=mask, other=0.0)
            z_raw = tl.load(raw_ptr + g_off + 2 * DH, mask=mask, other=0.0)
            o_raw = tl.load(raw_ptr + g_off + 3 * DH, mask=mask, other=0.0)
            p_off = st_row + t64 * NH * DH + cols[None, :]
            n_off = p_off + NH * DH
            c_prev = tl.load(cs_ptr + p_off, mask=mask, other=0.0)
            n_prev = tl.load(ns_ptr + p_off, mask=mask, other=0.0)
            m_prev = tl.load(ms_ptr + p_off, mask=mask, other=0.0)
            # DOCS: (c, n)_prev read as 0, as in the forward. m_prev is left as stored: at a start every term that
            # holds a = m_prev + log f also has a factor 0 (c_prev, n_prev, 1 - p_i or the zeroed carry).
            if DOCS:
                c_prev = tl.where(fresh[:, None], 0.0, c_prev)
                n_prev = tl.where(fresh[:, None], 0.0, n_prev)
            y_new = tl.load(ys_ptr + n_off, mask=mask, other=0.0)
            n_new = tl.load(ns_ptr + n_off, mask=mask, other=1.0)
            m_new = tl.load(ms_ptr + n_off, mask=mask, other=0.0)

            a = m_prev + _log_forget(f_raw, EXP_FORGET)
            x_i = i_raw - m_new
            x_f = a - m_new
            i_gate = tl.exp(tl.minimum(x_i, 0.0))
            f_gate = tl.exp(tl.minimum(x_f, 0.0))
            zt = _tanh(z_raw)
            og = _sigmoid(o_raw)
            g_c += g_y * og / n_new
            g_n -= g_y * y_new / n_new
            g_o = g_y * y_new * (1.0 - og)
            g_z = g_c * i_gate * (1.0 - zt * zt)
            g_xi = (g_c * zt + g_n) * _min_one_grad(x_i)
            g_xf = (g_c * c_prev + g_n * n_prev) * _min_one_grad(x_f)
            g_mnew = g_m - g_xi - g_xf
            p_i = tl.where(i_raw > a, 1.0, tl.where(i_raw < a, 0.0, 0.5))  # d max(ĩ, a) / dĩ, tie as torch
            p_i = tl.where(first_zero & (t == 0), 1.0, p_i)
            if DOCS:  # m_new = ĩ; with c_prev = n_prev = 0 above, g_xf and so g_a (dL/dm_prev, dL/df̃) are 0
                p_i = tl.where(fresh[:, None], 1.0, p_i)
                f_gate = tl.where(fresh[:, None], 0.0, f_gate)  # no carry into the previous document
            g_i = g_xi + p_i * g_mnew
            g_a = g_xf + (1.0 - p_i) * g_mnew
            g_f = g_a if EXP_FORGET else g_a * _sigmoid(-f_raw)  # d log σ(f̃) / df̃ = σ(-f̃)
            tl.store(gwx_ptr + g_off, g_i, mask=mask)
            tl.store(gwx_ptr + g_off + DH, g_f, mask=mask)
            tl.store(gwx_ptr + g_off + 2 * DH, g_z, mask=mask)
            tl.store(gwx_ptr + g_off + 3 * DH, g_o, mask=mask)
            tl.store(gc_ptr + c_off, g_c * f_gate, mask=mask)
            tl.store(gn_ptr + c_off, g_n * f_gate, mask=mask)
            tl.store(gm_ptr + c_off, g_a, mask=mask)
        _end_of_step(bar, (k + 1 - T0) * P, SYNC)
