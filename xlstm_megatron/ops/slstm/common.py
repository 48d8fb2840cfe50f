"""Types, shape checks and state helpers shared by the sLSTM reference and fast paths."""

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

# (y, c, n, m), each (B, NH, DH), in the compute dtype (fp32; fp64 for fp64 inputs).
SLSTMState = tuple[Tensor, Tensor, Tensor, Tensor]
ForgetGate = Literal["sigmoid", "exp"]
NUM_GATES = 4  # gate order along the gate axis: (i, f, z, o)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Internal math runs in fp32 (fp64 for fp64 inputs) so that bf16/fp16 inputs are safe."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# softplus(t) is returned as t above this threshold; log1p(exp(t)) - t < e^-40 is below fp64 resolution there.
SOFTPLUS_THRESHOLD = 40.0


def log_sigmoid(x: Tensor) -> Tensor:
    """log σ(x) = -softplus(-x), exact in fp32/fp64 for any finite x, gradient σ(-x) (0.5 at x == 0).

    Not ``F.logsigmoid``: on small fp64 CPU tensors it takes milliseconds per call (a threaded path that stalls on a
    busy machine), which made fp64 tests slow. ``F.softplus``'s default threshold (20) would be off by ~2e-9.
    """
    return -F.softplus(-x, threshold=SOFTPLUS_THRESHOLD)


def check_inputs(
    wx: Tensor, r: Tensor, b: Tensor, initial_state: SLSTMState | None, forget_gate: str
) -> tuple[int, int, int, int]:
    """Validate shapes and options; return (B, S, NH, DH)."""
    if forget_gate not in ("sigmoid", "exp"):
        raise ValueError(f"forget_gate must be 'sigmoid' or 'exp', got {forget_gate!r}")
    if wx.dim() != 5 or wx.shape[3] != NUM_GATES:
        raise ValueError(f"wx must be (B, S, NH, 4, DH), got {tuple(wx.shape)}")
    bsz, seq, nh, _, dh = wx.shape
    if tuple(r.shape) != (nh, dh, NUM_GATES, dh):
        raise ValueError(f"r must be (NH, DH, 4, DH) = {(nh, dh, NUM_GATES, dh)}, got {tuple(r.shape)}")
    if tuple(b.shape) != (nh, NUM_GATES, dh):
        raise ValueError(f"b must be (NH, 4, DH) = {(nh, NUM_GATES, dh)}, got {tuple(b.shape)}")
    if initial_state is not None:
        if len(initial_state) != 4:
            raise ValueError("initial_state must be a tuple (y, c, n, m)")
        for name, s in zip("ycnm", initial_state, strict=True):
            if tuple(s.shape) != (bsz, nh, dh):
                raise ValueError(f"initial_state {name} must be (B, NH, DH) = {(bsz, nh, dh)}, got {tuple(s.shape)}")
    return bsz, seq, nh, dh


def zero_state(bsz: int, nh: int, dh: int, dtype: torch.dtype, device: torch.device) -> SLSTMState:
    """The all-zero start state (n == 0 everywhere selects the ``m = ĩ`` branch at the first step)."""
    return tuple(torch.zeros(bsz, nh, dh, dtype=dtype, device=device) for _ in range(4))  # type: ignore[return-value]
