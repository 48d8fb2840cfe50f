"""Recurrent mLSTM: one step, and a step loop over a sequence (differentiated by autograd)."""

import torch
import torch.nn.functional as F
from torch import Tensor

from xlstm_megatron.ops.mlstm.common import (
    MLSTMState,
    cast_state,
    check_shapes,
    compute_dtype,
    normaliser_floor,
    zero_state,
)


def mlstm_recurrent_step(
    q: Tensor, k: Tensor, v: Tensor, i: Tensor, f: Tensor, state: MLSTMState | None, *, eps: float = 1e-6
) -> tuple[Tensor, MLSTMState]:
    """One mLSTM step. q, k (B, NH, DQK); v (B, NH, DV); i, f (B, NH); state (C, n, m) or None for the empty state.

    m' = max(log sigmoid(f) + m, i); C' = e^{log sigmoid(f) + m - m'} C + e^{i - m'} k v^T (n' likewise with k);
    h = (q/sqrt(DQK))^T C' / (max(|(q/sqrt(DQK))^T n'|, e^{-m'}) + eps).
    Returns h (B, NH, DV) in q's dtype and the new state in fp32 (fp64 for fp64 inputs).
    """
    check_shapes(q, k, v, i, f)
    out_dtype, dt = q.dtype, compute_dtype(q, k, v, i, f)
    q, k, v, i, f = (t.to(dt) for t in (q, k, v, i, f))
    C, n, m = zero_state(q[..., None, :], v[..., None, :], dt) if state is None else cast_state(state, dt)

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
) -> tuple[Tensor, MLSTMState]:
    """mLSTM over a sequence, one `mlstm_recurrent_step` per token (O(S) Python loop: for decoding and references).

    q, k (B, NH, S, DQK); v (B, NH, S, DV); i, f (B, NH, S).
    Returns h (B, NH, S, DV) and the state after the last token.
    """
    check_shapes(q, k, v, i, f)
    state = initial_state
    hs = []
    for t in range(q.shape[2]):
        h, state = mlstm_recurrent_step(q[:, :, t], k[:, :, t], v[:, :, t], i[:, :, t], f[:, :, t], state, eps=eps)
        hs.append(h)
    return torch.stack(hs, dim=2), state
