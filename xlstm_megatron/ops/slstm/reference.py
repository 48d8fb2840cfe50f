"""Readable per-step sLSTM (official v1 vanilla semantics) with plain autograd: the oracle for every fast path.

Per time step t, with y, c, n, m the previous state (all (B, NH, DH)):

    raw = wx_t + einsum("bhd,hdge->bhge", y, r) + b             gates (ĩ, f̃, z̃, o~) along dim 2
    log_f = log σ(f̃)    (forget_gate="sigmoid", official)   or   f̃   (forget_gate="exp", paper variant)
    m_new = ĩ                        if all(n == 0)   (over the whole (B, NH, DH) tensor, as the vanilla backend)
            max(ĩ, m + log_f)        otherwise
    i = min(exp(ĩ - m_new), 1),  f = min(exp(m + log_f - m_new), 1)
    c = f c + i tanh(z̃),  n = f n + i,  y = σ(o~) c / n

The ``n == 0`` test: the official vanilla backend (xlstm/blocks/slstm/src/vanilla/slstm.py) uses
``torch.all(n == 0.0)`` over the whole batch; the CUDA kernel tests per element. Both give the same y, c / n and
gradients of y whenever every element with n == 0 also has c == 0 (the stabiliser m cancels); only the stored m and
its round-off differ. We follow the vanilla backend.

``min(exp(x), 1)`` is computed as ``exp(minimum(x, 0))``: the same values and the same autograd gradients as the
vanilla backend's ``torch.minimum(torch.exp(x), 1)`` (including half the gradient at the tie x == 0), except that it
avoids 0 * inf = NaN in the backward when exp(x) overflows (x > ~88 in fp32, possible at an all-zero first step with
huge pre-activations), where the vanilla backend returns NaN gradients.

Packed documents (``doc_starts``, true at each document's first token): before such a token the row's y, c, n, m are
set to 0 and its m_new = ĩ, i.e. the first-step branch of a fresh start, per row; each document then equals its own
run from the zero state (outputs, final state and gradients).
"""

import torch
from torch import Tensor

from xlstm_megatron.ops.mlstm.common import check_doc_starts

from .common import ForgetGate, SLSTMState, check_inputs, compute_dtype, log_sigmoid, zero_state


def slstm_reference(
    wx: Tensor,
    r: Tensor,
    b: Tensor,
    *,
    initial_state: SLSTMState | None = None,
    forget_gate: ForgetGate = "sigmoid",
    doc_starts: Tensor | None = None,
) -> tuple[Tensor, SLSTMState]:
    """sLSTM over a sequence, one step at a time, differentiable by autograd.

    Args:
        wx: (B, S, NH, 4, DH) input contributions W x (no bias), gates in order (i, f, z, o).
        r: (NH, DH, 4, DH) block-diagonal recurrent weights (input dim, gate, output dim).
        b: (NH, 4, DH) gate biases.
        initial_state: (y, c, n, m), each (B, NH, DH); zeros if None.
        forget_gate: "sigmoid" (official v1) or "exp" (paper variant, log f = f̃).
        doc_starts: optional bool (B, S), true at each document's first token: the state restarts from zero there.
            ``initial_state`` feeds the first document unless position 0 is marked.

    Returns:
        y: (B, S, NH, DH) in wx.dtype, and the final state (y, c, n, m) in fp32 (fp64 for fp64 inputs).
    """
    bsz, seq, nh, dh = check_inputs(wx, r, b, initial_state, forget_gate)
    check_doc_starts(doc_starts, (bsz, seq))
    cd = compute_dtype(wx.dtype)
    with torch.autocast(device_type=wx.device.type, enabled=False):
        if initial_state is None:
            initial_state = zero_state(bsz, nh, dh, cd, wx.device)
        y, c, n, m = (s.to(cd) for s in initial_state)
        r_c, b_c = r.to(cd), b.to(cd)
        zero = torch.zeros((), dtype=cd, device=wx.device)
        ys = []
        for t in range(seq):
            fresh = None if doc_starts is None else doc_starts[:, t, None, None]  # (B, 1, 1)
            if fresh is not None:
                y, c, n, m = (torch.where(fresh, zero, s) for s in (y, c, n, m))
            raw = wx[:, t].to(cd) + torch.einsum("bhd,hdge->bhge", y, r_c) + b_c
            i_raw, f_raw, z_raw, o_raw = raw.unbind(dim=2)
            log_f = log_sigmoid(f_raw) if forget_gate == "sigmoid" else f_raw
            log_f_plus_m = m + log_f
            m_new = i_raw if bool(torch.all(n == 0.0)) else torch.maximum(i_raw, log_f_plus_m)
            if fresh is not None:
                m_new = torch.where(fresh, i_raw, m_new)
            i = torch.exp(torch.minimum(i_raw - m_new, zero))
            f = torch.exp(torch.minimum(log_f_plus_m - m_new, zero))
            c = f * c + i * torch.tanh(z_raw)
            n = f * n + i
            y = torch.sigmoid(o_raw) * c / n
            m = m_new
            ys.append(y)
        out = torch.stack(ys, dim=1) if ys else wx.new_zeros(bsz, 0, nh, dh, dtype=cd)
    return out.to(wx.dtype), (y, c, n, m)
