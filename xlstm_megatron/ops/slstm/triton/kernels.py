"""Triton kernels of the sLSTM: one program per (batch tile, head) runs the whole time loop (forward or reverse).

Layouts (all contiguous): wx / raw / g_wx (B, S, NH, 4, DH) with gates (i, f, z, o); r (NH, DH_in, 4, DH_out);
bias (NH, 4, DH); per-step states ys / cs / ns / ms (B, S + 1, NH, DH) fp32, index 0 holding the initial state.
The head dim is padded to the power of two D >= 16 and the batch tile BB >= 16 (tl.dot needs blocks >= 16); padded
entries load neutral values (R = 0, n = 1) so that they stay finite and never reach a real entry. All math is fp32
with IEEE dots (the torch path's fp32 semantics); the recurrent matrices stay in registers for the whole loop.
`first_zero_ptr` holds all(n0 == 0) over the whole initial state: the official "m = ĩ" branch, possible at t = 0 only.
"""

import triton
import triton.language as tl


@triton.jit
def _load_r(r_ptr, h, DH, g: tl.constexpr, D: tl.constexpr, TRANSPOSED: tl.constexpr = False):
    """R[h, :, g, :] (or its transpose) as a (D, D) fp32 block (zero-padded)."""
    k = tl.arange(0, D)
    if TRANSPOSED:
        ptrs = r_ptr + h * DH * 4 * DH + k[None, :] * (4 * DH) + g * DH + k[:, None]
    else:
        ptrs = r_ptr + h * DH * 4 * DH + k[:, None] * (4 * DH) + g * DH + k[None, :]
    mask = (k[:, None] < DH) & (k[None, :] < DH)
    return tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)


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
def slstm_fwd_kernel(
    wx_ptr, r_ptr, bias_ptr, y0_ptr, c0_ptr, n0_ptr, m0_ptr, first_zero_ptr,
    raw_ptr, ys_ptr, cs_ptr, ns_ptr, ms_ptr,
    B, S, NH, DH,
    BB: tl.constexpr, D: tl.constexpr, EXP_FORGET: tl.constexpr,
):
    pid_b = tl.program_id(0)
    h = tl.program_id(1)
    rows = (pid_b * BB + tl.arange(0, BB)).to(tl.int64)
    cols = tl.arange(0, D)
    mask = (rows[:, None] < B) & (cols[None, :] < DH)
    r_i = _load_r(r_ptr, h, DH, 0, D)
    r_f = _load_r(r_ptr, h, DH, 1, D)
    r_z = _load_r(r_ptr, h, DH, 2, D)
    r_o = _load_r(r_ptr, h, DH, 3, D)
    bmask = cols < DH
    b_i = tl.load(bias_ptr + h * 4 * DH + 0 * DH + cols, mask=bmask, other=0.0).to(tl.float32)[None, :]
    b_f = tl.load(bias_ptr + h * 4 * DH + 1 * DH + cols, mask=bmask, other=0.0).to(tl.float32)[None, :]
    b_z = tl.load(bias_ptr + h * 4 * DH + 2 * DH + cols, mask=bmask, other=0.0).to(tl.float32)[None, :]
    b_o = tl.load(bias_ptr + h * 4 * DH + 3 * DH + cols, mask=bmask, other=0.0).to(tl.float32)[None, :]

    st_off = rows[:, None] * (NH * DH) + h * DH + cols[None, :]  # (B, NH, DH) state tensors
    y = tl.load(y0_ptr + st_off, mask=mask, other=0.0).to(tl.float32)
    c = tl.load(c0_ptr + st_off, mask=mask, other=0.0).to(tl.float32)
    n = tl.load(n0_ptr + st_off, mask=mask, other=0.0).to(tl.float32)
    m = tl.load(m0_ptr + st_off, mask=mask, other=0.0).to(tl.float32)
    first_zero = tl.load(first_zero_ptr) != 0

    seq_off = rows[:, None] * ((S + 1) * NH * DH) + h * DH + cols[None, :]  # (B, S + 1, NH, DH) at step 0
    tl.store(ys_ptr + seq_off, y, mask=mask)
    tl.store(cs_ptr + seq_off, c, mask=mask)
    tl.store(ns_ptr + seq_off, n, mask=mask)
    tl.store(ms_ptr + seq_off, m, mask=mask)
    gate_off = rows[:, None] * (S * NH * 4 * DH) + h * 4 * DH + cols[None, :]  # (B, S, NH, 4, DH) at step 0
    for t in range(S):
        g_off = gate_off + t * (NH * 4 * DH)
        i_raw = tl.load(wx_ptr + g_off, mask=mask, other=0.0).to(tl.float32) + b_i + _dot(y, r_i)
        f_raw = tl.load(wx_ptr + g_off + DH, mask=mask, other=0.0).to(tl.float32) + b_f + _dot(y, r_f)
        z_raw = tl.load(wx_ptr + g_off + 2 * DH, mask=mask, other=0.0).to(tl.float32) + b_z + _dot(y, r_z)
        o_raw = tl.load(wx_ptr + g_off + 3 * DH, mask=mask, other=0.0).to(tl.float32) + b_o + _dot(y, r_o)
        tl.store(raw_ptr + g_off, i_raw, mask=mask)
        tl.store(raw_ptr + g_off + DH, f_raw, mask=mask)
        tl.store(raw_ptr + g_off + 2 * DH, z_raw, mask=mask)
        tl.store(raw_ptr + g_off + 3 * DH, o_raw, mask=mask)
        a = m + _log_forget(f_raw, EXP_FORGET)
        m_new = tl.where(first_zero & (t == 0), i_raw, tl.maximum(i_raw, a))
        i_gate = tl.exp(tl.minimum(i_raw - m_new, 0.0))
        f_gate = tl.exp(tl.minimum(a - m_new, 0.0))
        c = f_gate * c + i_gate * _tanh(z_raw)
        n = f_gate * n + i_gate
        y = _sigmoid(o_raw) * c / n
        m = m_new
        s_off = seq_off + (t + 1) * (NH * DH)
        tl.store(ys_ptr + s_off, y, mask=mask)
        tl.store(cs_ptr + s_off, c, mask=mask)
        tl.store(ns_ptr + s_off, n, mask=mask)
        tl.store(ms_ptr + s_off, m, mask=mask)


@triton.jit
def _min_one_grad(x):
    """d exp(min(x, 0)) / dx with autograd's tie convention for torch.minimum (half the gradient at x == 0)."""
    return tl.where(x < 0.0, tl.exp(x), tl.where(x == 0.0, 0.5, 0.0))


@triton.jit
def slstm_bwd_kernel(
    r_ptr, raw_ptr, ys_ptr, cs_ptr, ns_ptr, ms_ptr, first_zero_ptr,
    gy_ptr, gy_last_ptr, gc_last_ptr, gn_last_ptr, gm_last_ptr,
    gwx_ptr, gy0_ptr, gc0_ptr, gn0_ptr, gm0_ptr,
    B, S, NH, DH,
    BB: tl.constexpr, D: tl.constexpr, EXP_FORGET: tl.constexpr,
):
    """Reverse time loop. Carries dL/d(y, c, n, m) of the state after step t; per step it forms dL/d raw gates
    (stored as g_wx, fp32) and adds g_raw R^T to dL/dy_{t-1}. The R and bias gradients are reductions of g_wx (with
    the saved y_{t-1}) over batch and time: the caller does them as one matmul / sum, outside the sequential loop."""
    pid_b = tl.program_id(0)
    h = tl.program_id(1)
    rows = (pid_b * BB + tl.arange(0, BB)).to(tl.int64)
    cols = tl.arange(0, D)
    mask = (rows[:, None] < B) & (cols[None, :] < DH)
    rt_i = _load_r(r_ptr, h, DH, 0, D, True)
    rt_f = _load_r(r_ptr, h, DH, 1, D, True)
    rt_z = _load_r(r_ptr, h, DH, 2, D, True)
    rt_o = _load_r(r_ptr, h, DH, 3, D, True)
    first_zero = tl.load(first_zero_ptr) != 0

    st_off = rows[:, None] * (NH * DH) + h * DH + cols[None, :]
    g_yrec = tl.load(gy_last_ptr + st_off, mask=mask, other=0.0).to(tl.float32)  # dL/dy_t besides the output
    g_c = tl.load(gc_last_ptr + st_off, mask=mask, other=0.0).to(tl.float32)
    g_n = tl.load(gn_last_ptr + st_off, mask=mask, other=0.0).to(tl.float32)
    g_m = tl.load(gm_last_ptr + st_off, mask=mask, other=0.0).to(tl.float32)

    seq_off = rows[:, None] * ((S + 1) * NH * DH) + h * DH + cols[None, :]
    out_off = rows[:, None] * (S * NH * DH) + h * DH + cols[None, :]  # (B, S, NH, DH) at step 0
    gate_off = rows[:, None] * (S * NH * 4 * DH) + h * 4 * DH + cols[None, :]
    for k in range(S):
        t = S - 1 - k
        g_off = gate_off + t * (NH * 4 * DH)
        i_raw = tl.load(raw_ptr + g_off, mask=mask, other=0.0)
        f_raw = tl.load(raw_ptr + g_off + DH, mask=mask, other=0.0)
        z_raw = tl.load(raw_ptr + g_off + 2 * DH, mask=mask, other=0.0)
        o_raw = tl.load(raw_ptr + g_off + 3 * DH, mask=mask, other=0.0)
        p_off = seq_off + t * (NH * DH)
        n_off = p_off + NH * DH
        c_prev = tl.load(cs_ptr + p_off, mask=mask, other=0.0)
        n_prev = tl.load(ns_ptr + p_off, mask=mask, other=0.0)
        m_prev = tl.load(ms_ptr + p_off, mask=mask, other=0.0)
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

        g_y = tl.load(gy_ptr + out_off + t * (NH * DH), mask=mask, other=0.0) + g_yrec
        g_c += g_y * og / n_new
        g_n -= g_y * y_new / n_new
        g_o = g_y * y_new * (1.0 - og)
        g_z = g_c * i_gate * (1.0 - zt * zt)
        g_xi = (g_c * zt + g_n) * _min_one_grad(x_i)
        g_xf = (g_c * c_prev + g_n * n_prev) * _min_one_grad(x_f)
        g_mnew = g_m - g_xi - g_xf
        p_i = tl.where(i_raw > a, 1.0, tl.where(i_raw < a, 0.0, 0.5))  # d max(ĩ, a) / dĩ, tie as torch
        p_i = tl.where(first_zero & (t == 0), 1.0, p_i)
        g_i = g_xi + p_i * g_mnew
        g_a = g_xf + (1.0 - p_i) * g_mnew
        g_f = g_a if EXP_FORGET else g_a * _sigmoid(-f_raw)  # d log σ(f̃) / df̃ = σ(-f̃)
        g_c = g_c * f_gate
        g_n = g_n * f_gate
        g_m = g_a
        g_i = tl.where(mask, g_i, 0.0)
        g_f = tl.where(mask, g_f, 0.0)
        g_z = tl.where(mask, g_z, 0.0)
        g_o = tl.where(mask, g_o, 0.0)

        tl.store(gwx_ptr + g_off, g_i, mask=mask)
        tl.store(gwx_ptr + g_off + DH, g_f, mask=mask)
        tl.store(gwx_ptr + g_off + 2 * DH, g_z, mask=mask)
        tl.store(gwx_ptr + g_off + 3 * DH, g_o, mask=mask)
        g_yrec = _dot(g_i, rt_i) + _dot(g_f, rt_f) + _dot(g_z, rt_z) + _dot(g_o, rt_o)

    tl.store(gy0_ptr + st_off, g_yrec, mask=mask)
    tl.store(gc0_ptr + st_off, g_c, mask=mask)
    tl.store(gn0_ptr + st_off, g_n, mask=mask)
    tl.store(gm0_ptr + st_off, g_m, mask=mask)
