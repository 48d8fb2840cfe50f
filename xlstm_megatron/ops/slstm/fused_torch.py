"""Fast pure-torch sLSTM: all heads batched per step, hand-written backward-through-time.

Same math as :func:`~xlstm_megatron.ops.slstm.reference.slstm_reference` (official v1 vanilla semantics). At small
and medium sizes a recurrent cell costs per-kernel overhead, so this path minimises the ops per step:

- W x and the bias are added for the whole sequence at once; the recurrent matmul of all heads is one in-place
  ``baddbmm`` per step;
- per-step quantities live in stacked buffers so that pairs are updated by one op (13 ops per forward step);
- an ``autograd.Function`` saves only the per-step pre-activations and states; the backward recomputes, a chunk of
  steps at a time, every factor that does not depend on the incoming gradient, folding the chain rule through the
  stabiliser, ``min(., 1)`` and ``max`` into per-element coefficients (8 ops per backward step).

Internal layout is time-major and head-major, (S, NH, B, slot, DH), so each step's matmul is a ``bmm`` over heads.
Slots are (z̃, õ, f̃, ĩ, a) with a = m_{t-1} + log f: the first four are the gates (the recurrent weights are
permuted to this order once), (ĩ, a) are adjacent for the stabiliser max, and in the backward (f̃, ĩ, a) are adjacent
so that their gradients come out of one op.

The ``all(n == 0)`` branch of the official code is evaluated at the first step only. This is exact for valid states
(n >= 0): after a step n_new = f n + i where f = 1 or i = 1 (whichever exponent is the max), so every element with
n > 0 keeps n > 0, and after an all-zero step n = 1 everywhere; all(n == 0) can only hold at t = 0. Likewise
``min(., 1)`` can only clip at t = 0: afterwards both exponents are <= 0 by construction of m_new.

Packed documents (``doc_starts``): a document start is a per-row first step. At the steps where some row starts a
document (found with one host sync), the previous y, c, n, m of those rows read as 0, m_new = ĩ there and min(., 1)
clips; the backward zeroes the matching gradient paths into the previous state. Other steps run unchanged.
"""

import torch
import torch.nn.functional as F
from torch import Tensor

from xlstm_megatron.ops.mlstm.common import check_doc_starts

from .common import NUM_GATES, SOFTPLUS_THRESHOLD, ForgetGate, SLSTMState, check_inputs, compute_dtype, zero_state

_Z, _O, _F, _I, _A = range(5)  # internal slots
_GATES_TO_INTERNAL = [2, 3, 1, 0]  # internal gate slot k holds external gate (i, f, z, o)[_GATES_TO_INTERNAL[k]]
_INTERNAL_TO_GATES = [_I, _F, _Z, _O]  # external gate g sits in internal slot _INTERNAL_TO_GATES[g]
_CHUNK_ELEMENTS = 1 << 16  # backward coefficients are computed for about this many elements (per tensor) at a time


def _min_one_grad_factor(x: Tensor, e: Tensor) -> Tensor:
    """d exp(min(x, 0)) / dx given e = exp(x), with autograd's convention for ``torch.minimum`` at the tie x == 0."""
    return torch.where(x < 0.0, e, 0.5 * (x == 0.0).to(e.dtype))


def _max_select_factor(x: Tensor, y: Tensor) -> Tensor:
    """d max(x, y) / dx, with autograd's convention for ``torch.maximum`` at the tie (half the gradient)."""
    return (x - y).sign_().add_(1.0).mul_(0.5)


def _backward_coefficients(
    pre: Tensor,
    ys: Tensor,
    cn: Tensor,
    ms: Tensor,
    exp_forget: bool,
    first_is_all_zero: Tensor | None,
    fresh: Tensor | None = None,
) -> tuple[Tensor, ...]:
    """Per-element factors of the backward step for a chunk of T steps (inputs: pre (T, ...), states (T + 1, ...)).

    At step t, with (g_n, g_c) = dL/d(n_new, c_new) from later steps, g_y = dL/dy_new and g_m = dL/dm_new:
        (g_n, g_c) += g_y * dy_dnc
        dL/d(f̃, ĩ, a) = coef_c * g_c + coef_n * g_n + coef_m * g_m      (dL/da is g_m of step t - 1)
        dL/dz̃ = g_c * k_z,  dL/dõ = g_y * k_o
        dL/d(n, c) of step t - 1 = (g_n, g_c) * f
    The coefficients carry the chain rule through i, f = min(exp(. - m_new), 1) and m_new = max(ĩ, a) (ĩ at an
    all-zero first step, when ``first_is_all_zero`` is given) with autograd's tie conventions. ``fresh`` (T, 1, B, 1)
    marks document starts: there the previous (c, n) are 0, m_new = ĩ and nothing flows back into step t - 1's state.
    """
    z_raw, o_raw, f_raw, i_raw, a = pre.unbind(dim=3)
    m_new = ms[1:]
    x_i, x_f = i_raw - m_new, a - m_new
    e_i, e_f = torch.exp(x_i), torch.exp(x_f)
    d_i, d_f = _min_one_grad_factor(x_i, e_i), _min_one_grad_factor(x_f, e_f)
    p_i = _max_select_factor(i_raw, a)
    if first_is_all_zero is not None:
        p_i[0] = torch.where(first_is_all_zero, torch.ones_like(p_i[0]), p_i[0])
    c_prev, n_prev = cn[:-1].unbind(dim=3)
    if fresh is not None:
        p_i = p_i.masked_fill_(fresh, 1.0)
        c_prev, n_prev = c_prev.masked_fill(fresh, 0.0), n_prev.masked_fill(fresh, 0.0)
    p_a = 1.0 - p_i
    zt = torch.tanh(z_raw)
    # dL/d(ĩ - m_new) = d_i (zt g_c + g_n), dL/d(a - m_new) = d_f (c g_c + n g_n); their negated sum plus g_m is
    # dL/dm_new, shared out as p_i to ĩ and p_a to a.
    u_c, u_n, w_c, w_n = d_i * zt, d_i, d_f * c_prev, d_f * n_prev
    s_c, s_n = u_c + w_c, u_n + w_n
    a_c, a_n = w_c - p_a * s_c, w_n - p_a * s_n
    k_f = torch.ones_like(f_raw) if exp_forget else torch.sigmoid(-f_raw)  # d log f / d f̃
    coef_c = torch.stack([k_f * a_c, u_c - p_i * s_c, a_c], dim=3)
    coef_n = torch.stack([k_f * a_n, u_n - p_i * s_n, a_n], dim=3)
    coef_m = torch.stack([k_f * p_a, p_i, p_a], dim=3)
    og = torch.sigmoid(o_raw)
    n_new, y_new = cn[1:, :, :, 1], ys[1:]
    dy_dnc = torch.stack([-y_new / n_new, og / n_new], dim=3)
    k_z = e_i.clamp_max(1.0) * (1.0 - zt * zt)
    k_o = y_new * (1.0 - og)
    f = e_f.clamp_max(1.0).unsqueeze(3)
    if fresh is not None:
        f = f.masked_fill_(fresh.unsqueeze(3), 0.0)
    return coef_c, coef_n, coef_m, dy_dnc, k_z, k_o, f


class _SLSTMFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, wx: Tensor, r: Tensor, b: Tensor, y0: Tensor, c0: Tensor, n0: Tensor, m0: Tensor,
                exp_forget: bool, doc_starts: Tensor | None) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        bsz, seq, nh, _, dh = wx.shape
        cd = compute_dtype(wx.dtype)
        dev = wx.device
        with torch.autocast(device_type=dev.type, enabled=False):
            pre = torch.empty(seq, nh, bsz, 5, dh, dtype=cd, device=dev)
            wx_t, b_c = wx.permute(1, 2, 0, 3, 4), b.to(cd).unsqueeze(1)
            for slot, gate in enumerate(_GATES_TO_INTERNAL):
                torch.add(wx_t[:, :, :, gate], b_c[:, :, gate], out=pre[:, :, :, slot])
            r_int = r.to(cd)[:, :, _GATES_TO_INTERNAL].reshape(nh, dh, NUM_GATES * dh)
            ys = torch.empty(seq + 1, nh, bsz, dh, dtype=cd, device=dev)
            cn = torch.empty(seq + 1, nh, bsz, 2, dh, dtype=cd, device=dev)  # (c, n) stacked
            ms = torch.empty(seq + 1, nh, bsz, dh, dtype=cd, device=dev)
            ys[0] = y0.transpose(0, 1)
            cn[0, :, :, 0] = c0.transpose(0, 1)
            cn[0, :, :, 1] = n0.transpose(0, 1)
            ms[0] = m0.transpose(0, 1)
            fresh, reset_steps = _document_starts(doc_starts)
            first_is_all_zero = torch.all(n0 == 0.0)  # a tensor: no host sync
            if 0 in reset_steps:  # as the reference: the test sees the reset rows' n as 0
                first_is_all_zero = torch.all((n0 == 0.0) | doc_starts[:, 0, None, None])
            i_f = torch.empty(nh, bsz, 2, dh, dtype=cd, device=dev)  # (i, f)
            zt_one = torch.ones(nh, bsz, 2, dh, dtype=cd, device=dev)  # (tanh z̃, 1): c and n updated by one op

            # Per-step views, made once (Python indexing in the loop costs as much as the small kernels).
            gates = pre.view(seq, nh, bsz, 5 * dh)[:, :, :, : NUM_GATES * dh].unbind(0)
            i_a = pre[:, :, :, _I:].unbind(0)
            z_raw, o_raw, f_raw, i_raw, a = (pre[:, :, :, k].unbind(0) for k in range(5))
            ys_t, cn_t, ms_t, ms_u = ys.unbind(0), cn.unbind(0), ms.unbind(0), ms.unsqueeze(3).unbind(0)
            c_t, n_t = cn[:, :, :, 0].unbind(0), cn[:, :, :, 1].unbind(0)
            i_gate, f_gate, zt = i_f[:, :, 0:1], i_f[:, :, 1:2], zt_one[:, :, 0]
            for t in range(seq):
                reset = t in reset_steps
                y_prev, cn_prev, m_prev = ys_t[t], cn_t[t], ms_t[t]
                if reset:  # rows starting a document continue from the zero state
                    y_prev, m_prev = y_prev.masked_fill(fresh[t], 0.0), m_prev.masked_fill(fresh[t], 0.0)
                    cn_prev = cn_prev.masked_fill(fresh[t, :, :, None], 0.0)
                gates[t].baddbmm_(y_prev, r_int)
                if exp_forget:
                    torch.add(m_prev, f_raw[t], out=a[t])
                else:  # a = m + log σ(f̃) = m - softplus(-f̃), as common.log_sigmoid
                    torch.sub(m_prev, F.softplus(-f_raw[t], threshold=SOFTPLUS_THRESHOLD), out=a[t])
                m_new = torch.amax(i_a[t], dim=2, out=ms_t[t + 1])
                if t == 0:
                    torch.where(first_is_all_zero, i_raw[0], m_new, out=m_new)
                if reset:
                    torch.where(fresh[t], i_raw[t], m_new, out=m_new)
                torch.sub(i_a[t], ms_u[t + 1], out=i_f).exp_()
                if t == 0 or reset:
                    i_f.clamp_max_(1.0)
                torch.tanh(z_raw[t], out=zt)
                torch.mul(cn_prev, f_gate, out=cn_t[t + 1]).addcmul_(zt_one, i_gate)
                torch.sigmoid(o_raw[t], out=ys_t[t + 1]).mul_(c_t[t + 1]).div_(n_t[t + 1])

            ctx.save_for_backward(pre, ys, cn, ms, r_int, first_is_all_zero, fresh)
            ctx.exp_forget, ctx.reset_steps = exp_forget, reset_steps
            ctx.dtypes = (wx.dtype, r.dtype, b.dtype, y0.dtype, c0.dtype, n0.dtype, m0.dtype)
            y = ys[1:].permute(2, 0, 1, 3).to(dtype=wx.dtype, memory_format=torch.contiguous_format)
            final = (ys[seq], cn[seq, :, :, 0], cn[seq, :, :, 1], ms[seq])
            return (y, *(s.transpose(0, 1).contiguous() for s in final))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_y: Tensor, g_y_last: Tensor, g_c_last: Tensor, g_n_last: Tensor, g_m_last: Tensor):
        pre, ys, cn, ms, r_int, first_is_all_zero, fresh = ctx.saved_tensors
        reset_steps = ctx.reset_steps
        seq, nh, bsz, _, dh = pre.shape
        cd, dev = pre.dtype, pre.device
        with torch.autocast(device_type=dev.type, enabled=False):
            g_pre = torch.empty(seq, nh, bsz, 5, dh, dtype=cd, device=dev)  # same slots as pre
            g_gates = g_pre.view(seq, nh, bsz, 5 * dh)[:, :, :, : NUM_GATES * dh].unbind(0)
            g_fia = g_pre[:, :, :, _F:].unbind(0)
            g_z, g_o = g_pre[:, :, :, _Z].unbind(0), g_pre[:, :, :, _O].unbind(0)
            g_a = g_pre[:, :, :, _A:].unbind(0)  # (NH, B, 1, DH) views: dL/dm_{t-1}
            g_y = g_y.to(cd).permute(1, 2, 0, 3).unbind(0)  # S x (NH, B, DH)
            r_t = r_int.transpose(1, 2)  # (NH, 4 DH, DH)
            g_y_t = torch.empty(nh, bsz, dh, dtype=cd, device=dev)  # total dL/dy_new at step t
            g_nc = torch.empty(nh, bsz, 2, dh, dtype=cd, device=dev)  # total dL/d(n_new, c_new) at step t
            g_n, g_c, g_c_u, g_y_t_u = g_nc[:, :, 0:1], g_nc[:, :, 1], g_nc[:, :, 1:2], g_y_t.unsqueeze(2)
            carry = torch.stack([g_n_last, g_c_last], dim=2).to(cd).transpose(0, 1).contiguous()
            g_m = g_m_last.to(cd).transpose(0, 1).unsqueeze(2)  # dL/dm_new at step t, (NH, B, 1, DH)
            chunk = max(1, _CHUNK_ELEMENTS // (nh * bsz * dh))
            for start in reversed(range(0, seq, chunk)):
                stop = min(start + chunk, seq)
                coefs = _backward_coefficients(pre[start:stop], ys[start:stop + 1], cn[start:stop + 1],
                                               ms[start:stop + 1], ctx.exp_forget,
                                               first_is_all_zero if start == 0 else None,
                                               None if fresh is None else fresh[start:stop])
                coef_c, coef_n, coef_m, dy_dnc, k_z, k_o, f = (x.unbind(0) for x in coefs)
                for t in reversed(range(start, stop)):
                    k = t - start
                    if t == seq - 1:
                        torch.add(g_y[t], g_y_last.to(cd).transpose(0, 1), out=g_y_t)
                    elif t + 1 in reset_steps:  # y_t reaches step t + 1 only in rows that do not restart there
                        torch.add(g_y[t], torch.bmm(g_gates[t + 1], r_t).masked_fill_(fresh[t + 1], 0.0), out=g_y_t)
                    else:
                        torch.baddbmm(g_y[t], g_gates[t + 1], r_t, out=g_y_t)
                    torch.addcmul(carry, g_y_t_u, dy_dnc[k], out=g_nc)
                    acc = torch.mul(coef_c[k], g_c_u).addcmul_(coef_n[k], g_n)
                    torch.addcmul(acc, coef_m[k], g_m, out=g_fia[t])
                    g_m = g_a[t]
                    torch.mul(g_c, k_z[k], out=g_z[t])
                    torch.mul(g_y_t, k_o[k], out=g_o[t])
                    torch.mul(g_nc, f[k], out=carry)
            g_y_prev = torch.bmm(g_gates[0], r_t) if seq > 0 else g_y_last.to(cd).transpose(0, 1)
            if 0 in reset_steps:
                g_y_prev.masked_fill_(fresh[0], 0.0)

            need = ctx.needs_input_grad
            dt_wx, dt_r, dt_b, dt_y, dt_c, dt_n, dt_m = ctx.dtypes
            g_gates_all = g_pre[:, :, :, :NUM_GATES]  # (S, NH, B, 4, DH), internal gate order
            g_wx = None
            if need[0]:
                g_wx = torch.empty(bsz, seq, nh, NUM_GATES, dh, dtype=dt_wx, device=dev)
                for gate, slot in enumerate(_INTERNAL_TO_GATES):
                    g_wx[:, :, :, gate].copy_(g_pre[:, :, :, slot].permute(2, 0, 1, 3))
            g_r = None
            if need[1]:
                y_prev = ys[:-1] if fresh is None else ys[:-1].masked_fill(fresh, 0.0)
                g_r = torch.einsum("tkbd,tkbge->kdge", y_prev, g_gates_all)[:, :, _INTERNAL_TO_GATES].to(dt_r)
            g_b = g_gates_all.sum(dim=(0, 2))[:, _INTERNAL_TO_GATES].to(dt_b) if need[2] else None
            g_state = (
                g_y_prev.transpose(0, 1).to(dt_y) if need[3] else None,
                carry[:, :, 1].transpose(0, 1).to(dt_c) if need[4] else None,
                carry[:, :, 0].transpose(0, 1).to(dt_n) if need[5] else None,
                g_m.squeeze(2).transpose(0, 1).to(dt_m) if need[6] else None,
            )
        return g_wx, g_r, g_b, *g_state, None, None


def _document_starts(doc_starts: Tensor | None) -> tuple[Tensor | None, frozenset[int]]:
    """(B, S) bool -> the time-major mask (S, 1, B, 1) and the steps where some row starts a document (one sync)."""
    if doc_starts is None:
        return None, frozenset()
    steps = frozenset(doc_starts.any(dim=0).nonzero().flatten().tolist())
    return doc_starts.transpose(0, 1)[:, None, :, None].contiguous(), steps


def slstm(
    wx: Tensor,
    r: Tensor,
    b: Tensor,
    *,
    initial_state: SLSTMState | None = None,
    forget_gate: ForgetGate = "sigmoid",
    doc_starts: Tensor | None = None,
) -> tuple[Tensor, SLSTMState]:
    """Fast sLSTM over a sequence (same contract and math as ``slstm_reference``).

    Args:
        wx: (B, S, NH, 4, DH) input contributions W x (no bias), gates in order (i, f, z, o).
        r: (NH, DH, 4, DH) block-diagonal recurrent weights: step t adds einsum("bhd,hdge->bhge", y_{t-1}, r).
        b: (NH, 4, DH) gate biases.
        initial_state: (y, c, n, m), each (B, NH, DH); zeros if None. Must be a valid state (n >= 0).
        forget_gate: "sigmoid" (official v1, log f = log σ(f̃)) or "exp" (paper variant, log f = f̃).
        doc_starts: optional bool (B, S), true at each document's first token: the state restarts from zero there
            (``initial_state`` feeds the first document unless position 0 is marked).

    Returns:
        y: (B, S, NH, DH) in wx.dtype, and the final state (y, c, n, m) in fp32 (fp64 for fp64 inputs).
        Differentiable w.r.t. wx, r, b and the initial state (first order only).
    """
    bsz, seq, nh, dh = check_inputs(wx, r, b, initial_state, forget_gate)
    check_doc_starts(doc_starts, (bsz, seq))
    cd = compute_dtype(wx.dtype)
    if initial_state is None:
        initial_state = zero_state(bsz, nh, dh, cd, wx.device)
    y, *final = _SLSTMFunction.apply(wx, r, b, *initial_state, forget_gate == "exp", doc_starts)
    return y, tuple(final)  # type: ignore[return-value]
