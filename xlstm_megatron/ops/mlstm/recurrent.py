"""Recurrent mLSTM: one step, and a step loop over a sequence (differentiated by autograd)."""

import torch
import torch.nn.functional as F
from torch import Tensor

from xlstm_megatron.ops.mlstm.common import (
    MLSTMState,
    cast_state,
    check_doc_starts,
    check_shapes,
    compute_dtype,
    normaliser_floor,
    zero_state,
)


def _reset_rows(state: MLSTMState, doc_starts: Tensor) -> MLSTMState:
    """The empty state (C = n = 0, m = 0, exactly a fresh start) in the rows where a document starts."""
    C, n, m = state
    keep = ~doc_starts[:, None]  # (B, 1)
    return torch.where(keep[..., None, None], C, 0.0), torch.where(keep[..., None], n, 0.0), torch.where(keep, m, 0.0)


def mlstm_recurrent_step(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    i: Tensor,
    f: Tensor,
    state: MLSTMState | None,
    *,
    eps: float = 1e-6,
    doc_starts: Tensor | None = None,
) -> tuple[Tensor, MLSTMState]:
    """One mLSTM step. q, k (B, NH, DQK); v (B, NH, DV); i, f (B, NH); state (C, n, m) or None for the empty state.
    doc_starts: optional bool (B,), true where this token starts a document: that row starts from the empty state.

    m' = max(log sigmoid(f) + m, i); C' = e^{log sigmoid(f) + m - m'} C + e^{i - m'} k v^T (n' likewise with k);
    h = (q/sqrt(DQK))^T C' / (max(|(q/sqrt(DQK))^T n'|, e^{-m'}) + eps).
    Returns h (B, NH, DV) in q's dtype and the new state in fp32 (fp64 for fp64 inputs).
    """
    check_shapes(q, k, v, i, f)
    out_dtype, dt = q.dtype, compute_dtype(q, k, v, i, f)
    q, k, v, i, f = (t.to(dt) for t in (q, k, v, i, f))
    check_doc_starts(doc_starts, q.shape[:1])
    C, n, m = zero_state(q[..., None, :], v[..., None, :], dt) if state is None else cast_state(state, dt)
    if doc_starts is not None and state is not None:
        C, n, m = _reset_rows((C, n, m), doc_starts)

    log_f = F.logsigmoid(f)
    m_new = torch.maximum(log_f + m, i)
    f_act = torch.exp(log_f + m - m_new)[..., None]
    i_act = torch.exp(i - m_new)[..., None]
    C_new = f_act[..., None] * C + (i_act * k)[..., :, None] * v[..., None, :]
    n_new = f_act * n + i_act * k

    q_scaled = q * q.shape[-1] ** -0.5
    num = (q_scaled[..., None, :] @ C_new).squeeze(-2)  # (B, NH, DV)
    den = (q_scaled * n_new).sum(-1, keepdim=True)  # (B, NH, 1)
    h = num / (torch.maximum(den.abs(), normaliser_floor(m_new)[..., None]) + eps)
    return h.to(out_dtype), (C_new, n_new, m_new)


def mlstm_recurrent(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    i: Tensor,
    f: Tensor,
    *,
    initial_state: MLSTMState | None = None,
    eps: float = 1e-6,
    doc_starts: Tensor | None = None,
) -> tuple[Tensor, MLSTMState]:
    """mLSTM over a sequence, one `mlstm_recurrent_step` per token (O(S) Python loop: for decoding and references).

    q, k (B, NH, S, DQK); v (B, NH, S, DV); i, f (B, NH, S).
    doc_starts: optional bool (B, S), true at each document's first token (packed sequences): the state is reset to
    the empty state (C = n = 0, m = 0) before that token, so each document equals its own run from a zero state.
    `initial_state` precedes position 0 and so feeds the first document unless position 0 is marked (then that row
    drops it); splitting a packed sequence anywhere and carrying the state therefore equals one pass.
    Returns h (B, NH, S, DV) and the state after the last token.
    """
    check_shapes(q, k, v, i, f)
    check_doc_starts(doc_starts, (q.shape[0], q.shape[2]))
    state = initial_state
    hs = []
    for t in range(q.shape[2]):
        step_starts = None if doc_starts is None else doc_starts[:, t]
        qt, kt, vt, it, ft = q[:, :, t], k[:, :, t], v[:, :, t], i[:, :, t], f[:, :, t]
        h, state = mlstm_recurrent_step(qt, kt, vt, it, ft, state, eps=eps, doc_starts=step_starts)
        hs.append(h)
    return torch.stack(hs, dim=2), state
