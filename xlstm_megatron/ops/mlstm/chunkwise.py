"""Chunkwise mLSTM: O(S) memory in forward and backward, with two backward semantics.

- ``backward="exact"``: the gradient of the function the forward computes, i.e. what autograd through the normaliser
  max(|q.n|, exp(-m)) and the stabiliser m gives (xlstm v1 ``parallel_stabilized_simple``, mlstm_kernels
  ``*_native_autograd``).
- ``backward="constant"``: the normaliser and the stabilisers are treated as constants (mlstm_kernels
  ``chunkwise--native_custbw`` and its Triton kernels). The initial stabiliser m0 then gets no gradient and the final
  stabiliser m is returned non-differentiable (both are part of "the stabiliser"); C and n pass gradients both ways.

Both are hand-written `torch.autograd.Function`s that save the inputs, the inter-chunk states (NC + 1 of them),
the per-row denominator (and, for "exact", the output h) and recompute all intra-chunk work in backward.
"""

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from xlstm_megatron.ops.mlstm.chunkwise_backward import chunkwise_backward
from xlstm_megatron.ops.mlstm.chunkwise_forward import chunk_gates, chunkwise_forward
from xlstm_megatron.ops.mlstm.common import (
    MLSTMState,
    check_doc_starts,
    check_shapes,
    compute_dtype,
    normaliser_floor,
)


def _chunked(x: Tensor, num_chunks: int, chunk: int, dtype: torch.dtype, fill: float) -> Tensor:
    """(B, NH, S, ...) -> (B * NH, NC, L, ...) in `dtype`, the tail padded with `fill`."""
    B, NH, S = x.shape[:3]
    x = x.to(dtype).reshape(B * NH, S, *x.shape[3:])
    pad = num_chunks * chunk - S
    if pad:
        x = torch.cat([x, x.new_full((B * NH, pad, *x.shape[2:]), fill)], dim=1)
    return x.view(B * NH, num_chunks, chunk, *x.shape[2:])


def _unchunked(x: Tensor, like: Tensor) -> Tensor:
    """(B * NH, NC, L, ...) or (B * NH, NC * L) -> (B, NH, S, ...) in the dtype of `like` (B, NH, S, ...)."""
    B, NH, S = like.shape[:3]
    x = x.reshape(B * NH, -1, *x.shape[3:])[:, :S]
    return x.reshape(B, NH, S, *x.shape[2:]).to(like.dtype)


def _chunk_inputs(q, k, v, i, f, chunk_size: int, dtype: torch.dtype) -> tuple[Tensor, ...]:
    """Chunked q, k, v, i, log sigmoid(f); padding tokens (log f = 0, i = -inf) leave every state unchanged."""
    S = q.shape[2]
    L = min(chunk_size, S)
    NC = -(-S // L)
    qc, kc, vc = (_chunked(t, NC, L, dtype, 0.0) for t in (q, k, v))
    ic = _chunked(i, NC, L, dtype, float("-inf"))
    lfc = _chunked(F.logsigmoid(f.to(dtype)), NC, L, dtype, 0.0)
    return qc, kc, vc, ic, lfc


def _chunk_starts(doc_starts: Tensor | None, num_heads: int, chunk_size: int) -> Tensor | None:
    """(B, S) document starts -> (B * NH, NC, L) like the chunked inputs; padding tokens start nothing."""
    if doc_starts is None:
        return None
    B, S = doc_starts.shape
    L = min(chunk_size, S)
    expanded = doc_starts[:, None].expand(B, num_heads, S)
    return _chunked(expanded, -(-S // L), L, torch.bool, False)


class _MLSTMChunkwise(torch.autograd.Function):
    """Inputs q, k, v, i, f, C0, n0, m0 (state optional: all None), doc_starts (or None), chunk_size, eps, exact.
    Outputs h, final C, n, m. Saves the inputs, C/n before every chunk and at the end, den = q.n per row
    (and h for the exact semantics)."""

    @staticmethod
    def forward(ctx, q, k, v, i, f, C0, n0, m0, doc_starts, chunk_size: int, eps: float, exact: bool):
        B, NH, _, DQK = q.shape
        BH, DV = B * NH, v.shape[-1]
        dt = compute_dtype(q, k, v, i, f, C0, n0, m0)
        qc, kc, vc, ic, lfc = _chunk_inputs(q, k, v, i, f, chunk_size, dt)
        if C0 is None:
            C0_, n0_, m0_ = (q.new_zeros(shape, dtype=dt) for shape in ((BH, DQK, DV), (BH, DQK), (BH,)))
        else:
            C0_, n0_, m0_ = C0.to(dt).reshape(BH, DQK, DV), n0.to(dt).reshape(BH, DQK), m0.to(dt).reshape(BH)

        gates = chunk_gates(ic, lfc, m0_, _chunk_starts(doc_starts, NH, chunk_size))
        h, den, states = chunkwise_forward(qc, kc, vc, gates, C0_, n0_, eps)

        ctx.save_for_backward(q, k, v, i, f, C0, n0, m0, doc_starts, *states, den, h if exact else None)
        ctx.meta = (chunk_size, eps, exact)
        ctx.set_materialize_grads(False)
        C_S, n_S, m_S = states[2].view(B, NH, DQK, DV), states[3].view(B, NH, DQK), gates.M[:, -1].reshape(B, NH)
        if not exact:
            ctx.mark_non_differentiable(m_S)
        return _unchunked(h, q), C_S, n_S, m_S

    @staticmethod
    @once_differentiable
    def backward(ctx, dh, dC_S, dn_S, dm_S):
        q, k, v, i, f, C0, n0, m0, doc_starts, C_start, n_start, C_final, n_final, den, h = ctx.saved_tensors
        chunk_size, eps, exact = ctx.meta
        BH, dt = C_final.shape[0], C_final.dtype
        qc, kc, vc, ic, lfc = _chunk_inputs(q, k, v, i, f, chunk_size, dt)
        NC, L = qc.shape[1:3]
        m0_ = q.new_zeros(BH, dtype=dt) if m0 is None else m0.to(dt).reshape(BH)
        dC_S = None if dC_S is None else dC_S.to(dt).reshape(C_final.shape)
        dn_S = None if dn_S is None else dn_S.to(dt).reshape(n_final.shape)

        with torch.enable_grad():  # the exact semantics routes the stabiliser gradient through the max graph
            if exact:
                ic, lfc, m0_ = (t.detach().requires_grad_() for t in (ic, lfc, m0_))
            gates_graph = chunk_gates(ic, lfc, m0_, _chunk_starts(doc_starts, q.shape[1], chunk_size))
            m_rows_graph, m_final_graph = gates_graph.m, gates_graph.M[:, -1]
        gates = gates_graph.detached()

        floor = normaliser_floor(gates.m)
        normaliser = torch.maximum(den.abs(), floor) + eps
        dhc = torch.zeros_like(vc) if dh is None else _chunked(dh, NC, L, dt, 0.0)
        dnum = dhc / normaliser[..., None]
        dden = None
        if exact:  # h = num / (max(|den|, floor) + eps): the normaliser's own gradient
            hdh = (dhc * h).sum(-1) / normaliser  # = -d loss / d (normaliser + eps)
            dden = torch.where(den.abs() > floor, -hdh * den.sign(), torch.zeros_like(hdh))

        states = (C_start, n_start, C_final, n_final)
        dq, dk, dv, di, dlog_f, dC0, dn0 = chunkwise_backward(qc, kc, vc, gates, states, dnum, dden, dC_S, dn_S)
        di = di.view(BH, NC * L)
        dm0 = None
        if exact:
            # the stabilisers enter h only through eps: dh_i/dm_i = -h_i eps / (normaliser_i + eps); the final
            # state is stored divided by exp(M_S); m0 scales the initial state by exp(m0)
            dm_rows = -hdh * eps
            dM_S = torch.zeros_like(m0_) if dm_S is None else dm_S.to(dt).reshape(BH)
            if dC_S is not None:
                dM_S = dM_S - (dC_S * C_final).sum((-2, -1))
            if dn_S is not None:
                dM_S = dM_S - (dn_S * n_final).sum(-1)
            di_m, dlog_f_m, dm0_m = torch.autograd.grad((m_rows_graph, m_final_graph), (ic, lfc, m0_), (dm_rows, dM_S))
            di = di + di_m.view(BH, NC * L)
            dlog_f = dlog_f + dlog_f_m.view(BH, NC * L)
            if C0 is not None:
                dm0 = dm0_m + (dC0 * C_start[:, 0]).sum((-2, -1)) + (dn0 * n_start[:, 0]).sum(-1)

        df = _unchunked(dlog_f, i.to(dt)) * torch.sigmoid(-f.to(dt))
        grads_state = (None, None, None)
        if C0 is not None:
            grads_state = (
                dC0.reshape(C0.shape).to(C0.dtype),
                None if dn0 is None else dn0.reshape(n0.shape).to(n0.dtype),
                None if dm0 is None else dm0.reshape(m0.shape).to(m0.dtype),
            )
        grads_seq = (_unchunked(dq, q), _unchunked(dk, k), _unchunked(dv, v), _unchunked(di, i), df.to(f.dtype))
        return (*grads_seq, *grads_state, None, None, None, None)


def mlstm_chunkwise(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    i: Tensor,
    f: Tensor,
    *,
    chunk_size: int = 64,
    initial_state: MLSTMState | None = None,
    return_final_state: bool = False,
    backward: Literal["exact", "constant"] = "exact",
    eps: float = 1e-6,
    doc_starts: Tensor | None = None,
) -> Tensor | tuple[Tensor, MLSTMState]:
    """mLSTM over a sequence in chunks of `chunk_size`: batched L x L work inside chunks, a scan over chunk states.

    q, k (B, NH, S, DQK); v (B, NH, S, DV); i, f (B, NH, S) gate pre-activations. Any S >= 1 and chunk size (the tail
    chunk is padded with no-op tokens). `initial_state` (C, n, m) as in `MLSTMState`. Returns h (B, NH, S, DV) in q's
    dtype, and with `return_final_state` also the state after the last token (fp32, fp64 for fp64 inputs).
    Row stabiliser m_t equals the recurrent one, so chunkwise and `mlstm_recurrent` agree including the eps term;
    `mlstm_parallel` has no m_0 term and differs by O(eps) where all input gates are small.
    doc_starts: optional bool (B, S), true at each document's first token (packed sequences): the state is reset to
    the empty state there, as in `mlstm_recurrent` (values and both gradient semantics equal per-document runs);
    `initial_state` feeds the first document unless position 0 is marked.
    """
    check_shapes(q, k, v, i, f)
    check_doc_starts(doc_starts, (q.shape[0], q.shape[2]))
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if q.shape[2] < 1:
        raise ValueError("mlstm_chunkwise needs a sequence of at least one token")
    if backward not in ("exact", "constant"):
        raise ValueError(f"backward must be 'exact' or 'constant', got {backward!r}")
    C0, n0, m0 = (None, None, None) if initial_state is None else initial_state
    exact = backward == "exact"
    h, C, n, m = _MLSTMChunkwise.apply(q, k, v, i, f, C0, n0, m0, doc_starts, chunk_size, eps, exact)
    return (h, (C, n, m)) if return_final_state else h
