"""Soft capping ``cap * tanh(x / cap)`` (xLSTM-Large gate pre-activations and output logits)."""

from torch import Tensor


def soft_cap(x: Tensor, cap: float | None) -> Tensor:
    """Smoothly limit ``x`` to ``(-cap, cap)``; ``cap`` ``None`` or ``0`` returns ``x`` unchanged.

    Computed in ``x.dtype`` (elementwise; no reduction that would need fp32), like the official code.
    """
    if not cap:
        return x
    if cap < 0:
        raise ValueError(f"cap must be positive or None, got {cap}")
    return cap * (x / cap).tanh()
