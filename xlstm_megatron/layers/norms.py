"""Norm modules for Megatron's norm slots (TransformerLayer input/pre-MLP norm, final norm).

Megatron calls them as `cls(config=..., hidden_size=..., eps=...)`. Unlike torch's norms they support sequence
parallelism: the weight is marked `sequence_parallel` so Megatron all-reduces its gradient across TP ranks.
"""

from __future__ import annotations

import torch
from megatron.core.transformer.transformer_config import TransformerConfig

from xlstm_megatron.ops.norms import layer_norm, rms_norm


class _Norm(torch.nn.Module):
    weight_init: float = 1.0

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        dtype = config.params_dtype
        self.weight = torch.nn.Parameter(torch.full((hidden_size,), self.weight_init, dtype=dtype))
        self.weight.sequence_parallel = config.sequence_parallel


class XLSTMRMSNorm(_Norm):
    """RMSNorm of xLSTM-Large: fp32 reduction, weight initialised to 1."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


class XLSTMLayerNorm(_Norm):
    """LayerNorm of the v1 blocks: no bias, weight stored as w and applied as (1 + w), w initialised to 0."""

    weight_init = 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return layer_norm(x, self.weight, None, self.eps, weight_offset=1.0)


def norm_class_for(config: TransformerConfig) -> type[_Norm]:
    return XLSTMRMSNorm if config.normalization == "RMSNorm" else XLSTMLayerNorm
