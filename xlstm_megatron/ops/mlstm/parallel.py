"""Quadratic (S x S) stabilised mLSTM: the readable reference, differentiated by autograd."""

import torch
import torch.nn.functional as F
from torch import Tensor

from xlstm_megatron.ops.mlstm.common import check_doc_starts, check_shapes, compute_dtype, normaliser_floor


def _visible(S: int, doc_starts: Tensor | None, device: torch.device) -> Tensor:
    """(S, S) causal mask, or (B, 1, S, S) causal and same-document mask for packed sequences."""
    causal = torch.ones(S, S, dtype=torch.bool, device=device).tril()
    if doc_starts is None:
        return causal
    doc = doc_starts.cumsum(-1)  # (B, S) document index of every token
    return (causal & (doc[:, :, None] == doc[:, None, :]))[:, None]


def mlstm_parallel(
    q: Tensor, k: Tensor, v: Tensor, i: Tensor, f: Tensor, *, eps: float = 1e-6, doc_starts: Tensor | None = None
) -> Tensor:
    """mLSTM over a whole sequence from the empty state, in the parallel (attention-like) form.

    q, k (B, NH, S, DQK); v (B, NH, S, DV); i, f (B, NH, S) gate pre-activations (exponential input gate, forget gate
    log(sigmoid(f))). Returns h (B, NH, S, DV) in q's dtype; the math runs in fp32 (fp64 for fp64 inputs).

    log D_ij = sum_{l=j+1..i} log sigmoid(f_l) + i_j for j <= i; m_i = max_j log D_ij (row max, no m_0 term: it differs
    from the recurrent/chunkwise m only where every input gate is tiny, and then h differs by O(eps));
    C~ = (q k^T / sqrt(DQK)) * exp(log D - m); h = C~ v / (max(|rowsum C~|, exp(-m)) + eps).
    doc_starts: optional bool (B, S), true at each document's first token: j and i of different documents do not see
    each other (log D_ij = -inf), so each document equals its own run (the cumulative sums never cross a masked pair).
    """
    check_shapes(q, k, v, i, f)
    check_doc_starts(doc_starts, (q.shape[0], q.shape[2]))
    out_dtype, dt = q.dtype, compute_dtype(q, k, v, i, f)
    q, k, v, i, f = (t.to(dt) for t in (q, k, v, i, f))
    S, DQK = q.shape[-2], q.shape[-1]

    log_f_cum = F.logsigmoid(f).cumsum(-1)  # (B, NH, S)
    log_d = (log_f_cum[..., :, None] - log_f_cum[..., None, :]) + i[..., None, :]
    log_d = log_d.masked_fill(~_visible(S, doc_starts, q.device), float("-inf"))
    m = log_d.amax(-1, keepdim=True)  # (B, NH, S, 1)
    c_tilde = (q @ k.transpose(-2, -1)) * DQK**-0.5 * torch.exp(log_d - m)
    normaliser = torch.maximum(c_tilde.sum(-1, keepdim=True).abs(), normaliser_floor(m))
    h = (c_tilde @ v) / (normaliser + eps)
    return h.to(out_dtype)
