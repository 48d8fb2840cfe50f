"""Shared pieces of the mLSTM cell forms: state type, compute dtype, input checks, document-reset helpers."""

import math
from collections.abc import Callable

import torch
from torch import Tensor

MLSTMState = tuple[Tensor, Tensor, Tensor]
"""(C, n, m): C (B, NH, DQK, DV), n (B, NH, DQK), m (B, NH).

Convention of mlstm_kernels: C and n accumulate the *unscaled* k (q is scaled by DQK**-0.5 at readout) and are stored
divided by exp(m), i.e. the true memory is C * exp(m).
"""


def compute_dtype(*tensors: Tensor | None) -> torch.dtype:
    """fp64 if any input is fp64, else fp32: the cell math always runs in at least fp32 (bf16/fp16 inputs work)."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def check_shapes(q: Tensor, k: Tensor, v: Tensor, i: Tensor, f: Tensor) -> None:
    """q, k (B, NH, S, DQK), v (B, NH, S, DV), i, f (B, NH, S); the step form drops the S axis everywhere."""
    if q.shape != k.shape:
        raise ValueError(f"q and k must have the same shape, got {tuple(q.shape)} and {tuple(k.shape)}")
    if v.shape[:-1] != q.shape[:-1] or i.shape != q.shape[:-1] or f.shape != q.shape[:-1]:
        raise ValueError(
            f"inconsistent shapes: q {tuple(q.shape)}, v {tuple(v.shape)}, i {tuple(i.shape)}, f {tuple(f.shape)}"
        )


def check_doc_starts(doc_starts: Tensor | None, batch_seq: tuple[int, ...]) -> None:
    """`doc_starts` is None or a bool tensor of shape `batch_seq` ((B, S); (B,) for the step form)."""
    if doc_starts is None:
        return
    if doc_starts.dtype != torch.bool or tuple(doc_starts.shape) != tuple(batch_seq):
        raise ValueError(
            f"doc_starts must be a bool tensor of shape {tuple(batch_seq)}, got {doc_starts.dtype} "
            f"{tuple(doc_starts.shape)}"
        )


def segmented_scan(x: Tensor, starts: Tensor, op: Callable[[Tensor, Tensor], Tensor], identity: float) -> Tensor:
    """Inclusive scan of `op` (torch.add, torch.maximum) along the last dim, restarting wherever `starts` is true.

    Hillis-Steele: log2(L) steps of "combine with the value d to the left unless my window already reaches a start".
    The combined windows are disjoint, so a max routes its gradient to one argmax (ties split, as torch.maximum).
    Differentiable; out-of-range neighbours are `identity`, so no -inf - -inf ever occurs.
    """
    closed = starts
    d, L = 1, x.shape[-1]
    while d < L:
        left = torch.cat([x.new_full((*x.shape[:-1], d), identity), x[..., :-d]], dim=-1)
        left_closed = torch.cat([closed.new_ones((*closed.shape[:-1], d)), closed[..., :-d]], dim=-1)
        x = torch.where(closed, x, op(x, left))
        closed = closed | left_closed
        d *= 2
    return x


def zero_state(q: Tensor, v: Tensor, dtype: torch.dtype) -> MLSTMState:
    """The empty memory: C = 0, n = 0, m = 0 (same m_0 = 0 as the official recurrent and chunkwise kernels)."""
    B, NH, DQK, DV = *q.shape[:2], q.shape[-1], v.shape[-1]
    return (
        q.new_zeros((B, NH, DQK, DV), dtype=dtype),
        q.new_zeros((B, NH, DQK), dtype=dtype),
        q.new_zeros((B, NH), dtype=dtype),
    )


def cast_state(state: MLSTMState, dtype: torch.dtype) -> MLSTMState:
    C, n, m = state
    return C.to(dtype), n.to(dtype), m.to(dtype)


def normaliser_floor(m: Tensor) -> Tensor:
    """exp(-m), the lower bound of the normaliser max(|q.n|, exp(-m)), kept finite.

    When every gate is very negative, -m exceeds the exponent range: exp(-m) = inf gives h = 0 in the forward but
    inf * 0 = nan in autograd. Clamping the exponent at the largest finite value changes h by < 1e-30 there.
    """
    return torch.exp(torch.clamp(-m, max=math.log(torch.finfo(m.dtype).max)))
