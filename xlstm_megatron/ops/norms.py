"""Normalisations used by the xLSTM blocks: RMSNorm, LayerNorm and per-head LayerNorm.

All normalise over the trailing dim(s) only, so any leading layout works (batch-first or Megatron's sequence-first).
Statistics and the affine transform are computed in fp32 (fp64 stays fp64); the result is returned in ``x.dtype``.
``weight=None`` means no scaling (``weight_offset`` is then ignored).
"""

import torch
import torch.nn.functional as F
from torch import Tensor


def _upcast(x: Tensor) -> Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _affine(
    y: Tensor, weight: Tensor | None, bias: Tensor | None, weight_offset: float, shape: tuple[int, ...]
) -> Tensor:
    """``y * (weight + offset) + bias`` in y's (upcast) dtype, with weight/bias viewed as ``shape``."""
    if weight is not None:
        y = y * (weight.to(y.dtype).view(shape) + weight_offset)
    if bias is not None:
        y = y + bias.to(y.dtype).view(shape)
    return y


def rms_norm(x: Tensor, weight: Tensor | None, eps: float = 1e-6) -> Tensor:
    """RMSNorm over the last dim: ``x / sqrt(mean(x^2) + eps) * weight``. ``weight``: ``(D,)`` or ``None``."""
    y = F.rms_norm(_upcast(x), (x.shape[-1],), None, eps)
    return _affine(y, weight, None, 0.0, (x.shape[-1],)).to(x.dtype)


def layer_norm(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
    weight_offset: float = 0.0,
) -> Tensor:
    """LayerNorm over the last dim (biased variance), scaled by ``weight + weight_offset``.

    ``weight_offset=1.0`` is the xLSTM v1 parametrisation (weight stored as ``w``, applied as ``1 + w``).
    """
    y = F.layer_norm(_upcast(x), (x.shape[-1],), None, None, eps)
    return _affine(y, weight, bias, weight_offset, (x.shape[-1],)).to(x.dtype)


def head_norm(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None = None,
    eps: float = 1e-6,
    weight_offset: float = 0.0,
) -> Tensor:
    """Per-head LayerNorm: ``x`` is ``(..., NH, DH)``, normalised over DH for every head separately.

    Equals a group norm with NH groups over the NH*DH channels (v1's ``MultiHeadLayerNorm``) and ``xlstm_large``'s
    ``MultiHeadLayerNorm``. ``weight``/``bias`` are flat ``(NH*DH,)``, scale is ``weight + weight_offset``
    (v1: eps 1e-5, offset 1; xLSTM-Large: eps 1e-6, offset 0). Returns ``(..., NH, DH)``.
    """
    if x.dim() < 2:
        raise ValueError(f"x must be (..., NH, DH), got {tuple(x.shape)}")
    y = F.layer_norm(_upcast(x), (x.shape[-1],), None, None, eps)
    return _affine(y, weight, bias, weight_offset, tuple(x.shape[-2:])).to(x.dtype)
