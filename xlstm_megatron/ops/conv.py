"""Causal depthwise 1-D convolution over the sequence, with a carried state for chunked and step-wise inference.

Layout is batch-first ``(B, S, C)`` (any number of leading batch dims is accepted: ``(*batch, S, C)``). Megatron's
sequence-first activations ``(S, B, C)`` must be passed as ``x.transpose(0, 1)`` (a view; the convolution needs a
channels-before-time copy anyway).

Semantics (cross-correlation, as ``nn.Conv1d``): with kernel size K and ``weight[c, k]``,
``y[t, c] = bias[c] + sum_k weight[c, k] * x[t - (K - 1) + k, c]``, where inputs before the sequence start come from
``state`` (zeros if none). ``weight[:, K - 1]`` therefore multiplies the current token. The official
``nn.Conv1d`` weight ``(C, 1, K)`` maps to ours as ``weight[:, 0, :]``.

Packed documents: ``doc_starts`` (``(*batch, S)`` bool, true at each document's first token) zeroes every input of
the window that lies before the current token's document start, so each document equals its own run from a zero
state. ``state`` precedes position 0 and so feeds the first document unless position 0 is marked.
"""

import torch
import torch.nn.functional as F
from torch import Tensor

from xlstm_megatron.ops.mlstm.common import check_doc_starts


def _check_shapes(x: Tensor, weight: Tensor, state: Tensor | None) -> int:
    if weight.dim() != 2 or weight.shape[0] != x.shape[-1] or weight.shape[1] < 1:
        raise ValueError(f"weight must be (C, K) with C={x.shape[-1]} and K >= 1, got {tuple(weight.shape)}")
    k = weight.shape[1]
    if state is not None:
        expected = (*x.shape[:-2], k - 1, x.shape[-1])
        if tuple(state.shape) != expected:
            raise ValueError(f"state must be {expected} (*batch, K-1, C), got {tuple(state.shape)}")
    return k


def _window_mask(doc_starts: Tensor, k: int) -> Tensor:
    """(*batch, S + 1, K) bool: which of the K window inputs of token t (lags K-1 .. 0) lie in t's document; row S
    is a virtual token continuing the last document (it masks the carried state)."""
    seq = doc_starts.shape[-1]
    pos = torch.arange(seq + 1, device=doc_starts.device)
    marks = torch.where(doc_starts, pos[:-1], -k)  # before the first mark the state (positions -(K-1)..-1) is visible
    marks = torch.cat([marks, marks.new_full((*marks.shape[:-1], 1), -k)], dim=-1)
    start = marks.cummax(-1).values  # first position of each token's document
    lags = torch.arange(k - 1, -1, -1, device=doc_starts.device)
    return lags <= (pos - start)[..., None]


def _packed_conv(padded: Tensor, weight: Tensor, bias: Tensor | None, mask: Tensor) -> Tensor:
    """Causal conv of ``padded`` (*batch, K-1+S, C) with the window inputs outside ``mask`` (*batch, S, K) zeroed."""
    k = weight.shape[1]
    windows = padded.unfold(-2, k, 1)  # (*batch, S, C, K): windows[..., t, :, j] = x[t - (K-1) + j]
    windows = torch.where(mask[..., None, :], windows, 0.0)
    y = torch.einsum("...ck,ck->...c", windows, weight.to(padded.dtype))
    return y if bias is None else y + bias.to(padded.dtype)


def causal_conv1d(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    *,
    state: Tensor | None = None,
    return_state: bool = False,
    doc_starts: Tensor | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Causal depthwise conv1d of a whole sequence.

    Args:
        x: ``(*batch, S, C)`` input.
        weight: ``(C, K)`` one filter per channel.
        bias: optional ``(C,)``.
        state: optional ``(*batch, K-1, C)``, the K-1 inputs preceding ``x`` (zeros if ``None``).
        return_state: also return the new state, the last K-1 inputs of ``cat(state, x)`` (so it includes old-state
            rows when ``S < K-1``); with ``doc_starts``, inputs before the last document's start are zeroed in it.
        doc_starts: optional ``(*batch, S)`` bool, true at each document's first token (packed sequences).

    Returns:
        ``y`` of shape ``(*batch, S, C)`` in ``x.dtype``, and with ``return_state`` the tuple ``(y, new_state)``.
    """
    if x.dim() < 2:
        raise ValueError(f"x must be (*batch, S, C), got {tuple(x.shape)}")
    k = _check_shapes(x, weight, state)
    check_doc_starts(doc_starts, x.shape[:-1])
    batch_shape, (seq_len, channels) = x.shape[:-2], x.shape[-2:]
    if state is None:
        state = x.new_zeros((*batch_shape, k - 1, channels))
    padded = torch.cat([state.to(x.dtype), x], dim=-2)  # (*batch, K-1+S, C)
    if doc_starts is not None:
        mask = _window_mask(doc_starts, k)
        y = _packed_conv(padded, weight, bias, mask[..., :-1, :])
        if not return_state:
            return y
        last = torch.where(mask[..., -1, :-1, None], padded[..., padded.shape[-2] - (k - 1) :, :], 0.0)
        return y, last
    # F.conv1d wants (N, C, T); weights follow the input dtype so fp32 master weights work with bf16 activations.
    flat = padded.reshape(-1, k - 1 + seq_len, channels).transpose(1, 2)
    w = weight.to(x.dtype).unsqueeze(1)  # (C, 1, K)
    b = bias.to(x.dtype) if bias is not None else None
    y = F.conv1d(flat, w, b, groups=channels)  # (N, C, S): "valid" conv over the left-padded input is causal
    y = y.transpose(1, 2).reshape(*batch_shape, seq_len, channels)
    if not return_state:
        return y
    # Copy so a carried state does not keep the whole padded sequence alive.
    return y, padded[..., padded.shape[-2] - (k - 1) :, :].clone()


def causal_conv1d_step(
    x: Tensor, weight: Tensor, bias: Tensor | None, state: Tensor, *, doc_starts: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """One token of :func:`causal_conv1d`.

    Args:
        x: ``(*batch, C)`` the current token.
        weight: ``(C, K)``; bias: ``(C,)`` or ``None``.
        state: ``(*batch, K-1, C)`` the previous K-1 inputs (not modified).
        doc_starts: optional ``(*batch,)`` bool, true where this token starts a document (the state is then zeros).

    Returns:
        ``(y, new_state)`` with ``y`` ``(*batch, C)`` in ``x.dtype`` and ``new_state`` ``(*batch, K-1, C)``.
    """
    _check_shapes(x.unsqueeze(-2), weight, state)
    check_doc_starts(doc_starts, x.shape[:-1])
    if doc_starts is not None:
        state = torch.where(doc_starts[..., None, None], 0.0, state)
    window = torch.cat([state.to(x.dtype), x.unsqueeze(-2)], dim=-2)  # (*batch, K, C)
    # Accumulate in (at least) fp32 so that bf16 steps round like the fp32-accumulating full-sequence convolution.
    acc = torch.promote_types(x.dtype, torch.float32)
    y = torch.einsum("...kc,ck->...c", window.to(acc), weight.to(acc))
    if bias is not None:
        y = y + bias.to(acc)
    return y.to(x.dtype), window[..., 1:, :]
