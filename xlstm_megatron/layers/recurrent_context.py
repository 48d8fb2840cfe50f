"""Recurrent state of the xLSTM mixers during generation, carried through GPTModel as its `inference_context`.

Megatron threads `inference_context` from `GPTModel.forward` down to every layer's `self_attention(...)`, so a
mixer finds its state there without any change to Megatron's forward path. Each mixer keeps one tuple of
batch-first tensors under its global `layer_number`:

    mLSTM (Large)  (C, n, m)                     C (B, h, DQK, DV), n (B, h, DQK), m (B, h)
    mLSTM (v1)     (conv, C, n, m)               conv (B, K - 1, local channels)
    sLSTM          (conv, y, c, n, m)            y, c, n, m (B, h, DH)

(h: this tensor-parallel rank's heads). The size does not depend on how many tokens were consumed. A forward with
S > 1 tokens (prefill) runs the chunkwise/sequence kernels from the stored state and stores their final state; a
forward with S == 1 (decode) runs the recurrent step. Training and evaluation pass no context and are unchanged.

The context subclasses Megatron's `BaseInferenceContext` as a static batch (every row advances one token per decode
step); `sequence_len_offset` counts the tokens consumed. It is not a KV cache: Megatron's own attention layers
('*' in a pattern) cannot use it, and the mixers refuse Megatron's KV-cache contexts.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from megatron.core.inference.config import InferenceConfig
from megatron.core.inference.contexts.base_context import BaseInferenceContext
from torch import Tensor

from xlstm_megatron.ops.conv import causal_conv1d, causal_conv1d_step
from xlstm_megatron.ops.kernels import Kernel, mlstm_chunkwise_kernel
from xlstm_megatron.ops.mlstm import MLSTMState, mlstm_recurrent_step

LayerState = tuple[Tensor, ...]


class RecurrentInferenceContext(BaseInferenceContext):
    """Per-layer recurrent states keyed by global layer number (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__(InferenceConfig(materialize_only_last_token_logits=False))
        self.states: dict[int, LayerState] = {}
        self.sequence_len_offset = 0
        self.batch_size_offset = 0

    def is_static_batching(self) -> bool:
        return True

    def is_decode_only(self) -> bool:
        """Megatron's layers ask this to tell prefill from decode."""
        return self.sequence_len_offset > 0

    def get(self, layer_number: int) -> LayerState | None:
        """The state of a layer, or None before its first token (the zero state)."""
        return self.states.get(layer_number)

    def set(self, layer_number: int, state: LayerState) -> None:
        self.states[layer_number] = state

    def nbytes(self) -> int:
        """Bytes held by all states (this rank's share under tensor parallelism)."""
        return sum(t.numel() * t.element_size() for state in self.states.values() for t in state)

    def select(self, rows: Tensor) -> None:
        """Keep batch rows `rows` (a 1-D index tensor), in that order, e.g. to drop finished sequences."""
        self.states = {n: tuple(t.index_select(0, rows.to(t.device)) for t in s) for n, s in self.states.items()}

    @classmethod
    def cat(cls, contexts: Sequence[RecurrentInferenceContext]) -> RecurrentInferenceContext:
        """One batch from contexts of separately prefilled prompts (rows in the given order)."""
        out = cls()
        layers = contexts[0].states.keys()
        if any(c.states.keys() != layers for c in contexts):
            raise ValueError("contexts to concatenate must hold the same layers")
        out.states = {n: tuple(torch.cat(parts, dim=0) for parts in zip(*(c.states[n] for c in contexts),
                                                                           strict=True)) for n in layers}
        out.sequence_len_offset = max(c.sequence_len_offset for c in contexts)
        return out


def recurrent_context_of(inference_context: object) -> RecurrentInferenceContext | None:
    """The mixers' view of GPTModel's `inference_context`: None (training, evaluation) or ours; any other kind fails."""
    if inference_context is None or isinstance(inference_context, RecurrentInferenceContext):
        return inference_context
    raise NotImplementedError(
        f"xLSTM mixers keep a recurrent state, not a KV cache: pass a RecurrentInferenceContext "
        f"(xlstm_megatron.inference) instead of {type(inference_context).__name__}"
    )


def mlstm_with_state(
    q: Tensor, k: Tensor, v: Tensor, i: Tensor, f: Tensor, state: MLSTMState | None, *, chunk_size: int, eps: float,
    kernel: Kernel = "auto",
) -> tuple[Tensor, MLSTMState]:
    """mLSTM cell from `state` (None: zero state): q, k (B, h, S, DQK), v (B, h, S, DV), i, f (B, h, S).

    S == 1 takes the recurrent step, S > 1 (prefill) the chunkwise form through the kernel dispatch training uses
    (`kernel`: Triton on GPU); both have the recurrent form's stabiliser, so they agree with a full-sequence chunkwise
    forward. Returns h (B, h, S, DV) and the state after the last token.
    """
    if q.shape[2] == 1:
        h, new_state = mlstm_recurrent_step(q[:, :, 0], k[:, :, 0], v[:, :, 0], i[:, :, 0], f[:, :, 0], state, eps=eps)
        return h.unsqueeze(2), new_state
    h, new_state = mlstm_chunkwise_kernel(
        q, k, v, i, f, kernel=kernel, chunk_size=chunk_size, initial_state=state, return_final_state=True, eps=eps
    )
    return h, new_state


def conv_with_state(
    x: Tensor, weight: Tensor, bias: Tensor | None, state: Tensor | None
) -> tuple[Tensor, Tensor]:
    """Causal depthwise conv of x (B, S, C) continuing from `state` (B, K - 1, C) (None: zeros) -> (y, new state)."""
    if x.shape[1] == 1:
        if state is None:
            state = x.new_zeros(x.shape[0], weight.shape[1] - 1, x.shape[2])
        y, new_state = causal_conv1d_step(x[:, 0], weight, bias, state)
        return y.unsqueeze(1), new_state
    return causal_conv1d(x, weight, bias, state=state, return_state=True)


__all__ = ["LayerState", "RecurrentInferenceContext", "conv_with_state", "mlstm_with_state", "recurrent_context_of"]
